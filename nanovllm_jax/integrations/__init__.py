"""Integrations with other systems; each imports its system lazily, so the package imports without it."""
