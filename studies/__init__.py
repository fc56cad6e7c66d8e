"""The project's own study machinery (not installed with ``peer``): the statistics and figures of PEER's
gap to the other methods (:mod:`studies.gaps`) and the report that refreshes the tables of docs/
(:mod:`studies.report`, ``python -m studies.report SWEEP.toml --into DOC``). docs/CONTRACTS.md argues the
boundary."""
