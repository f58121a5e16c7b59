"""The Python API on the embedded model: no key, no network. Run from the repository: python examples/quickstart.py"""

import polars as pl

import pipeline

# A DataFrame in, the same rows out with completion, tokens, status and error columns.
reviews = pl.read_csv("data/reviews.csv").head(3)
out = pipeline.complete(
    reviews,
    prompt="Summarise this review in one sentence: {text}",
    provider="local",  # starts SmolLM2-135M-Instruct on 127.0.0.1 for the call
    max_tokens=48,
    checkpoint_dir="out/quickstart-calls.checkpoint",  # a second call resumes instead of paying again
)
print(out.select("review_id", "completion", "status", "completion_tokens"))

# A whole job as `pipeline run` runs it, with a result instead of an exit code.
result = pipeline.run("configs/summarise-reviews.yaml", limit=3, output="out/quickstart.parquet")
print(result.outcome, f"{result.ok} ok, {result.errors} errors, {result.from_checkpoint} from the checkpoint")
print("output:", result.output, "metrics:", result.metrics_file)
