"""Development tools run from a checkout (not installed): real local servers for the tests and
benchmarks."""
