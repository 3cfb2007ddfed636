"""The zoo: one file per choice on each axis (representation, backbone, generator, objective, strategy, alignment)."""
