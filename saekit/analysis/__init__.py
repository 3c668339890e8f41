"""Model-agnostic analyses of SAE features that any study may use.

They read activation stores and SAEs from the core (`saekit.activations`, `saekit.sae`) and never
import a study (`saekit.studies`) or the mini world (`saekit.mini`).
"""
