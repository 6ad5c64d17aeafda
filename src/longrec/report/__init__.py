"""Tables and plots of datasets, runs and benchmarks."""
