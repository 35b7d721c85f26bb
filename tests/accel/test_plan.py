"""The inference plan: one `precision` resolved once per call (caption, stream, served request),
what each plan runs, and no precision string compared anywhere outside `mmcap/accel/`."""
import ast
import asyncio
from pathlib import Path

import httpx
import pytest
import torch
from helpers import CAPTIONS, circle_images, tiny_config

from mmcap import Captioner
from mmcap.accel.plan import InferencePlan, as_plan
from mmcap.generation.attention import TorchAttention

pytestmark = pytest.mark.usefixtures("one_thread")
PACKAGE = Path(__file__).resolve().parents[2] / "mmcap"


@pytest.fixture
def counted(monkeypatch):
    """Counts `InferencePlan.resolve` calls."""
    calls = []
    original = InferencePlan.resolve.__func__

    def resolve(cls, precision, device="cpu", *args, **kwargs):
        calls.append(precision)
        return original(cls, precision, device, *args, **kwargs)

    monkeypatch.setattr(InferencePlan, "resolve", classmethod(resolve))
    return calls


@pytest.fixture
def model():
    torch.manual_seed(0)
    return Captioner.from_config(tiny_config(), captions=CAPTIONS).eval()


@pytest.mark.parametrize("precision", ["fp32", "bf16", "int8"])
def test_a_caption_call_resolves_its_precision_once(model, counted, precision):
    images = circle_images() * 3
    model.caption(images, batch_size=4, max_new_tokens=4, precision=precision)  # three batches
    model.caption_details(images[:2], batch_size=1, max_new_tokens=4, precision=precision, num_beams=2)
    assert counted == [precision, precision]


def test_a_stream_resolves_once(model, counted, tmp_path):
    files = []
    for i, im in enumerate(circle_images() * 2):
        files.append(tmp_path / f"{i}.png")
        im.save(files[-1])
    records = list(model.caption_stream([str(f) for f in files], batch_size=2, num_workers=0, precision="bf16",
                                        max_new_tokens=4))
    assert len(records) == 8 and counted == ["bf16"]


def test_a_served_app_resolves_once_for_all_requests(model, counted):
    import io

    from mmcap.serve.app import create_app

    app = create_app(model, "bf16", max_batch_size=2)
    assert counted == ["bf16"]

    async def post_three():
        transport = httpx.ASGITransport(app=app)
        async with app.router.lifespan_context(app), httpx.AsyncClient(transport=transport, base_url="http://t") as c:
            for im in circle_images()[:3]:
                buf = io.BytesIO()
                im.save(buf, "PNG")
                r = await c.post("/caption", files={"image": ("x.png", buf.getvalue(), "image/png")})
                assert r.status_code == 200, r.text

    asyncio.run(post_three())
    assert counted == ["bf16"]


def test_plans_say_what_they_run(monkeypatch):
    from mmcap.accel import plan as plan_module

    monkeypatch.setattr(plan_module, "bf16_is_fast", lambda device: False)  # a CPU whose bf16 is slow
    fp32, auto, int8 = (as_plan(p) for p in ("fp32", "auto", "int8"))
    assert fp32.exact and not fp32.draft and not fp32.tune_allocator and fp32.attention.dtype is None
    assert auto.dtype == torch.float32 and auto.exact  # auto = fp32 here: the reference pipeline
    assert int8.int8_decoder and not int8.exact and int8.dtype == torch.float32
    # its caches and the image's keys in int8 whatever the compute dtype (the kernels compute in fp32)
    assert int8.attention.dtype == int8.cache_dtype == torch.int8 and int8.attention.image_dtype == torch.int8
    monkeypatch.setattr(plan_module, "bf16_is_fast", lambda device: True)
    bf16 = as_plan("auto")
    assert bf16.dtype == torch.bfloat16 and bf16.draft and bf16.tune_allocator and not bf16.int8_decoder
    assert as_plan(bf16) is bf16  # a plan passes through
    gpu_int8 = InferencePlan.resolve("int8", "meta")  # int8 runs on CPUs only: auto elsewhere
    assert not gpu_int8.int8_decoder and gpu_int8.dtype == torch.bfloat16
    with pytest.raises(ValueError, match="precision must be one of"):
        as_plan("fp16")


def test_the_fp32_plan_attends_with_torch_outside_autocast(model):
    image_kv = [(torch.randn(1, 4, 32), torch.randn(1, 4, 32))]
    assert isinstance(as_plan("fp32").attention(image_kv, 2, 8, autocast=False), TorchAttention)


@pytest.mark.parametrize("kind", ["linear", "mlp"])
def test_an_int8_plan_projects_the_grid_with_int8_twins_and_fp32_exactly(kind):
    """The projection's linear layers in int8 where the decoder's are (the same twins as
    `int8_linears`), within the decoder layers' kind of error; fp32 computes the module itself; the
    module's own layers are back in place afterwards."""
    from mmcap.accel.quantize import int8_available, int8_linears
    from mmcap.config import ProjectionConfig
    from mmcap.model.projection import GridProjection

    if not int8_available("cpu"):
        pytest.skip("no int8 kernels on this CPU")
    torch.manual_seed(0)
    projection = GridProjection(ProjectionConfig(kind=kind), 256, 64, max_grid=4).eval()
    grid = torch.randn(3, 256, 4, 4).relu()
    with torch.no_grad():
        want = projection(grid)
        assert torch.equal(as_plan("fp32").project(projection, grid), want)
        got = as_plan("int8").project(projection, grid)
        with int8_linears(projection):
            assert torch.equal(got, projection(grid))
        assert sum(isinstance(m, torch.nn.Linear) for m in projection.modules()) == (1 if kind == "linear" else 2)
        assert not torch.equal(got, want) and float((got - want).norm() / want.norm()) < 0.02


def _precision_comparisons(path: Path):
    """(line, literal) of every comparison of a precision with its name: `precision == "int8"`,
    `args.precision in ("auto", ...)` (other "auto"s, such as `output_stride == "auto"`, pass)."""
    names = {"fp32", "bf16", "auto", "int8"}
    for node in ast.walk(ast.parse(path.read_text())):
        operands = [node.left, *node.comparators] if isinstance(node, ast.Compare) else []
        if any("precision" in (getattr(o, "id", "") + getattr(o, "attr", "")).lower() for o in operands):
            for side in operands:
                consts = [side] if isinstance(side, ast.Constant) else getattr(side, "elts", [])
                for c in consts:
                    if isinstance(c, ast.Constant) and c.value in names:
                        yield node.lineno, c.value


def test_no_precision_string_is_compared_outside_accel():
    found = [f"{p.relative_to(PACKAGE)}:{line} compares {value!r}"
             for p in PACKAGE.rglob("*.py") if "accel" not in p.relative_to(PACKAGE).parts
             for line, value in _precision_comparisons(p)]
    assert found == []
    assert list(_precision_comparisons(PACKAGE / "accel" / "plan.py"))  # the check does see comparisons
