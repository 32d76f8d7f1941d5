"""Ray Tune / Ray Train runners and the search-space language of ``rec-dist tune`` (see tune_spaces/README.md)."""
