"""Generative quality benchmark: a small Llama-shaped causal LM pre-trained here on text from wheels,
fully fine-tuned into generation experts, merged through mergefleet's pipeline (and Twin-Merging),
each merged model scored by exact match of its greedy generation.

``python bench/quality_generative/run.py --out DIR`` runs it; see ``README.md`` for the protocol.
"""
