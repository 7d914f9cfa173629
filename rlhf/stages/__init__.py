"""The stages: one module each, registering what `stage=<name>` runs (rlhf.config.stages.Stage).

A module here declares its names, its validation, its run function and its sizing plan in one place
and calls `register_stage` at import; rlhf.config.stages imports every module of this package on its
first lookup. Stage modules import only the schema at module level; trainers, workers, models and
data are imported inside their functions, so listing the stages (`rlhf --help`, run.plan, validation
of another stage) stays cheap. Adding a stage: docs/stages.md ("Adding a stage").
"""
