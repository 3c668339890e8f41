"""saekit: sparse autoencoders for vision models.

The pipeline, one module per stage::

    images -> encoder -> activation store -> SAEs -> analyses -> figures -> book
    data      models     activations         sae     ontology, probes, ...   plots, widgets
"""

__version__ = "0.1.0"
