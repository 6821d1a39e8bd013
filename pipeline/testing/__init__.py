"""Backbones and data made for testing the method itself, importable by jobs as ``--model module:factory``."""
