"""pipeline from Python on the embedded model: no key, no network. Run from the repository: python examples/quickstart.py"""

import polars as pl

import pipeline

reviews = pl.read_csv("data/reviews.csv").head(3)
out = pipeline.complete(reviews, prompt="Summarise this review in one sentence: {text}", provider="local", max_tokens=48)
print(out.select("review_id", "completion", "status", "completion_tokens"))
result = pipeline.run("configs/summarise-reviews.yaml", limit=3, output="out/quickstart.parquet")
print(result.outcome, f"{result.ok} ok, {result.errors} errors, {result.from_checkpoint} from the checkpoint")
