"""Twin-Merging's serving half: router features and training, ``TwinModel`` inference, loading a
published twin output, predict. Needs the ``twin`` extra (transformers, peft); imports
``workers`` and ``manifests``, never ``pipeline``."""
