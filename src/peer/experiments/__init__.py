"""Experiments built on the library (they import it; it never imports them):

- :mod:`peer.experiments.mainjob` - ``peer main``: dense vs PEER at equal FLOPs on the starter corpus;
- :mod:`peer.experiments.sweep` - ``peer sweep``: isoFLOP sweeps, ablations, seeds, comparisons.
"""
