"""The benchmark harness: private Redis, peer environments, measurements and reports."""
