"""Image columns from the other ways in: a YAML config's `image_columns:`, the Python API
(`pipeline.complete(..., image_columns=[...])`) with frames that hold the images' bytes, and
`pipeline estimate`, whose image tokens are checked against each provider's published examples."""

from __future__ import annotations

from pathlib import Path

import polars as pl
import pyarrow as pa
import pytest

import pipeline
from pipeline.errors import ConfigError, InputError
from tests import imagefiles
from tests.conftest import chat_requests, run_cli, write_table
from tests.fakeserver import FakeLLMServer
from tests.test_images import decoded, label, user_content


def yaml_config(path: str, server: FakeLLMServer, images: str, **more: str) -> None:
    lines = [
        "input: data/rows.csv", "output: out/r.parquet", 'prompt: "Describe: {text}"', images,
        f"base_url: {server.url}/v1", "model: gpt-4o", "progress: false", *(f"{k}: {v}" for k, v in more.items()),
    ]  # fmt: skip
    Path(path).write_text("\n".join(lines) + "\n")


@pytest.fixture
def photos() -> dict[str, bytes]:
    made = {"a.png": imagefiles.png(40, 30, seed=1), "b.gif": imagefiles.gif(5, 7)}
    Path("data").mkdir()
    for name, data in made.items():
        Path("data", name).write_bytes(data)
    write_table("data/rows.csv", [{"photo": "a.png", "logo": "b.gif", "text": "one"}])
    return made


@pytest.mark.parametrize("images", ["image_columns: [photo, logo]", "image_columns:\n  - photo\n  - logo"])
def test_yaml_image_columns(server: FakeLLMServer, photos: dict[str, bytes], images: str) -> None:
    yaml_config("job.yaml", server, images)
    result = run_cli("run", "job.yaml")
    assert result.exit_code == 0, result.output
    out = pl.read_parquet("out/r.parquet")
    assert out["completion"].item() == f"echo: Describe: one {label(photos['a.png'])} {label(photos['b.gif'], 'image/gif')}"


def test_yaml_one_image_column_as_a_word(server: FakeLLMServer, photos: dict[str, bytes]) -> None:
    yaml_config("job.yaml", server, "image_columns: photo", image_detail="low")
    assert run_cli("run", "job.yaml").exit_code == 0
    assert user_content(chat_requests(server)[0])[0]["image_url"]["detail"] == "low"


def test_the_embedded_model_refuses_image_columns_before_anything_starts(photos: dict[str, bytes]) -> None:
    Path("job.yaml").write_text(
        'input: data/rows.csv\noutput: out/r.parquet\nprompt: "Describe: {text}"\nprovider: local\nimage_columns: [photo]\n'
    )
    result = run_cli("run", "job.yaml")
    assert result.exit_code == 2, result.output
    assert "the embedded model (SmolLM2-135M-Instruct) reads text only, so it cannot take the image column 'photo'" in (
        result.output
    )
    assert "--base-url" in result.output and "Traceback" not in result.output
    assert "starting the embedded model" not in result.output and not Path("out").exists()
    with pytest.raises(ConfigError, match="reads text only"):
        pipeline.complete(pl.DataFrame({"photo": ["data/a.png"], "text": ["x"]}), prompt="{text}", provider="local",
                          image_columns=["photo"])  # fmt: skip


def test_complete_takes_a_frame_of_image_bytes_and_gives_them_back(server: FakeLLMServer) -> None:
    png, gif = imagefiles.png(20, 10, seed=7), imagefiles.gif(3, 3)
    frame = pl.DataFrame({"id": [1, 2, 3], "photo": [png, gif, None], "text": ["png", "gif", "none"]},
                         schema={"id": pl.Int64, "photo": pl.Binary, "text": pl.String})  # fmt: skip
    settings = dict(prompt="Describe: {text}", image_columns=["photo"], base_url=f"{server.url}/v1", model="gpt-4o",
                    checkpoint_dir="answers", progress=False)  # fmt: skip
    out = pipeline.complete(frame, **settings, max_error_rate=0.5)
    assert out.columns[:3] == ["id", "photo", "text"] and out.schema["photo"] == pl.Binary
    assert out["photo"].to_list() == [png, gif, None]  # the bytes come back as they went in
    assert out["completion"].to_list()[:2] == [
        f"echo: Describe: png {label(png)}",
        f"echo: Describe: gif {label(gif, 'image/gif')}",
    ]
    assert out["status"].to_list() == ["ok", "ok", "error"] and "column 'photo' is null in this row" in out["error"][2]
    sent = {user_content(r)[-1]["text"]: user_content(r)[0] for r in chat_requests(server)}
    assert decoded(sent["Describe: png"]["image_url"]["url"]) == png

    # An Arrow table in, an Arrow table out; the same answers from the checkpoint, nothing sent again.
    server.reset()
    table = pipeline.complete(frame.to_arrow(), **settings, max_error_rate=0.5)
    assert isinstance(table, pa.Table) and table.column("photo").type in (pa.binary(), pa.large_binary())
    assert table.column("completion").to_pylist()[:2] == out["completion"].to_list()[:2]
    assert chat_requests(server) == []
    # null_as_empty: the row goes without its image.
    out = pipeline.complete(frame, **settings, null_as_empty=True)
    assert out["completion"][2] == "echo: Describe: none"


def test_complete_refuses_a_missing_image_column_before_sending(server: FakeLLMServer) -> None:
    with pytest.raises(InputError, match=r"The image column 'picture' \(--image-column\) is not in .*Did you mean 'pictures'"):
        pipeline.complete(pl.DataFrame({"pictures": ["a.png"], "text": ["x"]}), prompt="{text}", image_columns=["picture"],
                          base_url=f"{server.url}/v1", model="gpt-4o")  # fmt: skip
    assert chat_requests(server) == []


# ---- estimate: each provider's published rule, checked against its published examples -----------------

# (provider, model, extra flags, image sizes, tokens the provider's documentation gives for them)
PUBLISHED = [
    # OpenAI, "Calculating costs": 1024 x 1024 at detail high is 765 tokens; 2048 x 4096 is 1105; 512 x 512, one tile, 255.
    ("openai", "gpt-4o", (), [(1024, 1024), (2048, 4096), (512, 512)], 765 + 1105 + 255),
    # At detail low, a flat 85 whatever the size.
    ("openai", "gpt-4o", ("--image-detail", "low"), [(4096, 8192), (512, 512)], 85 + 85),
    # Patch models: 1024 x 1024 is 1024 patches; 1800 x 2400 is scaled to 1452 patches; x 1.62 for gpt-4.1-mini.
    ("openai", "gpt-4.1-mini", (), [(1024, 1024), (1800, 2400)], 1659 + 2353),
    # Anthropic, "Vision": 200 x 200 is about 54 tokens, 1000 x 1000 about 1334, 1092 x 1092 about 1590.
    ("anthropic", "claude-sonnet-4-5", (), [(200, 200), (1000, 1000), (1092, 1092)], 54 + 1334 + 1590),
]


@pytest.mark.parametrize(("provider", "model", "flags", "sizes", "tokens"), PUBLISHED)
def test_estimate_counts_image_tokens_by_the_published_rule(
    provider: str, model: str, flags: tuple[str, ...], sizes: list[tuple[int, int]], tokens: int
) -> None:
    names = [f"{w}x{h}.png" for w, h in sizes]
    for (w, h), name in zip(sizes, names, strict=True):
        Path(name).write_bytes(imagefiles.png(w, h, noise=False))  # a flat colour: large in pixels, small on disk
    write_table("rows.csv", [{"photo": n, "text": n} for n in names])
    result = run_cli("estimate", "-i", "rows.csv", "-p", "Describe {text}", "--image-column", "photo", "--provider", provider,
                     "-m", model, "--base-url", "http://127.0.0.1:9/v1", "--samples", "1", *flags)  # fmt: skip
    assert result.exit_code == 0, result.output
    line = next(x for x in result.output.splitlines() if x.strip().startswith("images:"))
    assert f"{len(sizes)} images in the requests to send: about {tokens:,} tokens, by " in line
    assert ("Anthropic's published rule" if provider == "anthropic" else "OpenAI's published rule") in line
    assert f"base64,… [image/png, {Path(names[0]).stat().st_size:,} bytes: {names[0]}]" in result.output or (
        provider == "anthropic" and f"… [image/png, {Path(names[0]).stat().st_size:,} bytes: {names[0]}]" in result.output
    )  # the sample request shows what each image is, not its base64
