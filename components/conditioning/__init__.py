"""How the generator reads the backbone: which hidden states become its condition, and how its blocks attend to them.

A conditioning is called as ``conditioning(backbone, captions) -> condition`` (a tensor or a
:class:`~unizoo.components.conditioning.condition.Condition`) and names, in
``generator_arguments``, what the generator must be built with to read that condition.
``queries`` (the default) is the shallow MetaQuery read; ``layerwise`` and ``joint_attention``
are the deep fusions of Tang et al. (LLM hidden states layer by layer; MM-DiT's joint attention).
"""
