"""Experiment drivers and their reports: how keel's results in docs/results/ were made.

They are not product tools (those are the CLIs in tools/). The runs themselves launch through Hydra
multirun (`python pretrain/main.py -m ...`, each script's docstring gives the commands); the scripts
here orchestrate stages and aggregate run folders. What they share, one concern per module:
`runs` (run folders, arms and seeds), `seeds` (tuning apart from reported seeds), `stats` (paired seeds,
TOST, summaries), `tables`, `provenance` (what every results JSON opens with), `stages` (the drivers'
training stages), `cli` (the drivers' and reports' command line) and `preregistration` (the designs whose
margins, seeds and grids were fixed before their runs, and the rule that extends a grid at an edge).
Each raises `ExperimentError`.
"""


class ExperimentError(ValueError):
    """A problem an experiment script reports in one line (`cli.guarded`): no runs found, one seed twice in
    an arm, a stage that failed."""
