"""Experiment drivers and their reports: how keel's results in docs/results/ were made.

They are not product tools (those are the CLIs in tools/). The runs themselves launch through Hydra
multirun (`python pretrain/main.py -m ...`, each script's docstring gives the commands); the scripts
here orchestrate stages and aggregate run folders, with what they share in common.py.
"""
