"""Rows to requests and answers to columns.

- `prompts`: render the template, system prompt and parameters per row; the request key.
- `fields`: what a placeholder names (a column, a struct's field) and the "did you mean" when it names none.
- `structured`: JSON Schema extraction: how a schema is asked for, and replies checked and turned into typed columns.
"""
