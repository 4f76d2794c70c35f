"""Configuration: one model of the options (each stated once, with its type,
default, checks and sentence), their three sources (file, environment, CLI),
and what derives from it: validation, channel entries and the channel API's
bodies, secrets, ``--help`` and the option reference. See ``model``."""
