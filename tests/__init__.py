"""The test suite, a package so that its shared pieces import as `tests.support`."""
