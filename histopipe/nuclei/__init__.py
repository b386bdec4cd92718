"""Nuclei-level image–label co-synthesis: datasets, joint diffusion, instance separation, evaluation."""
