"""The commands: each module is one console script (rlhf-train, rlhf-train-rm, rlhf-label,
rlhf-compare, rlhf-plugins, rlhf-build-embedded) or a part of one. Commands use the library
and the contracts; nothing below imports a command."""
