"""Batch mode (`--mode batch`): the rows still to answer go through the provider's batch API at half
the price, answered within 24 hours; one unchanged command submits one night and collects the next.

One invocation, holding the checkpoint's lock throughout:
  1. replay the ledger, and settle a submit that a kill cut short (adopt the batch it created);
  2. poll each open batch once; fold each finished one into the checkpoint (its answers become
     checkpoint answers, exactly as online ones);
  3. write the rows still to answer into request files within the provider's limits, and submit each;
  4. with --wait, poll until nothing is open (the first poll after 2 s, then 1.5x longer each time, up to 5 min);
  5. nothing open: the output is written from the checkpoint as usual; else exit 3.

Never paying twice rests on the ledger (`<checkpoint>/batches/ledger.jsonl`, append-only, one fsync
per line; a torn last line is ignored): the request file is written and `prepared` recorded before
any network call, `created` as soon as the provider answers. A run killed in between finds
`prepared` without `created` and lists the provider's batches for the one whose metadata names it:
it adopts that batch instead of creating another. A key in an open batch is never submitted again;
an answered key never again. No key is in any file here: the API key travels in a header.

    ledger.py     the ledger: what was prepared, created, folded; never paying twice rests on it
    endpoints.py  the provider's batch endpoints (OpenAI's files and batches, Anthropic's Message Batches)
    step.py       one invocation: recover, poll, fold, submit (`BatchStep`)
"""

from pipeline.engines.batch.endpoints import AnthropicBatches, OpenAIBatches, batch_api
from pipeline.engines.batch.ledger import Entry, Ledger
from pipeline.engines.batch.step import BatchStep, Outcome

__all__ = ["AnthropicBatches", "BatchStep", "Entry", "Ledger", "OpenAIBatches", "Outcome", "batch_api"]
