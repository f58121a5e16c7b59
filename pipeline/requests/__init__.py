"""Rows to requests and answers to columns.

- `prompts`: render the template, system prompt and parameters per row; the request key.
- `structured`: JSON Schema extraction: how a schema is asked for, and replies checked and turned into typed columns.
"""
