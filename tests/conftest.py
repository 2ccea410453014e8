"""Shared fixtures live in tests/fixtures/, one module per component."""

pytest_plugins = [
    "tests.fixtures.s3",
    "tests.fixtures.models",
    "tests.fixtures.servers",
    "tests.fixtures.ray_local",
    "tests.fixtures.priorgen_server",
    "tests.fixtures.trainer_server",
    "tests.fixtures.inference_server",
]
