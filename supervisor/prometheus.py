"""Prometheus text exposition format, version 0.0.4, written without a client library."""

import math


def escape_label_value(value: str) -> str:
    """Escape a label value as the text format 0.0.4 requires: backslash, double quote, newline."""
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def format_sample_value(value: float) -> str:
    if isinstance(value, int):
        return str(value)
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(float(value))


class MetricsWriter:
    """Lines of the Prometheus text format: a HELP and a TYPE line before each family's samples."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def family(self, name: str, kind: str, help_text: str) -> None:
        escaped = help_text.replace("\\", "\\\\").replace("\n", "\\n")
        self.lines.append(f"# HELP {name} {escaped}")
        self.lines.append(f"# TYPE {name} {kind}")

    def sample(self, name: str, labels: dict[str, str], value: float) -> None:
        if labels:
            pairs = ",".join(f'{key}="{escape_label_value(str(text))}"' for key, text in labels.items())
            self.lines.append(f"{name}{{{pairs}}} {format_sample_value(value)}")
        else:
            self.lines.append(f"{name} {format_sample_value(value)}")

    def histogram(
        self, name: str, labels: dict[str, str], bounds: tuple[float, ...], counts: list[int], total: float
    ) -> None:
        """Write one histogram series: cumulative `_bucket` lines up to `le="+Inf"`, `_sum` and `_count`.

        `counts[i]` is the number of observations in bucket i alone: at most `bounds[i]`
        and above the bound before it. The last item counts those above every bound.
        """
        running = 0
        for bound, count in zip((*bounds, math.inf), counts, strict=True):
            running += count
            self.sample(f"{name}_bucket", {**labels, "le": format_sample_value(float(bound))}, running)
        self.sample(f"{name}_sum", labels, float(total))
        self.sample(f"{name}_count", labels, running)

    def text(self) -> str:
        return "\n".join(self.lines) + "\n"
