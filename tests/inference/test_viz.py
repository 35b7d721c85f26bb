"""Figures: one panel per token / image, titled with what the model said."""
import pytest
import torch
from PIL import Image

from mmcap.inference.viz import caption_grid, plot_attention

pytestmark = pytest.mark.usefixtures("one_thread")


def test_plot_attention_panel_per_token():
    image = Image.new("RGB", (64, 48), "white")
    attention = torch.softmax(torch.randn(3, 2, 2).flatten(1), -1).view(3, 2, 2)
    fig = plot_attention(image, ["a", "red", ""], attention)
    titled = [ax.get_title() for ax in fig.axes if ax.get_title()]
    assert titled == ["a", "red", "<end>"]
    assert fig.axes[0].images[1].get_array().shape == (48, 64)  # heatmap upsampled to the image
    with pytest.raises(ValueError, match="2 tokens but 3"):
        plot_attention(image, ["a", "b"], attention)


def test_caption_grid_titles():
    fig = caption_grid(torch.zeros(2, 3, 8, 8), ["a red circle", "a blue square"], [["a red circle"], ["x"]])
    titles = [ax.get_title(loc="left") for ax in fig.axes]
    assert titles[0].startswith("✓ a red circle")  # exact match with a reference is marked
    assert titles[1].startswith("a blue square") and "ref: x" in titles[1]


def test_plot_attention_takes_the_caption_result(tiny_gpt2, image_files):
    image = Image.open(image_files[0])
    result = tiny_gpt2.caption(image, num_beams=2, max_new_tokens=5, return_attention=True)
    caption, attention = result  # unpacks as it always did
    assert len(result.words) == len(attention) and result.attention is attention
    titled = [ax.get_title() for ax in plot_attention(image, result).axes if ax.get_title()]
    assert titled == [w or "<end>" for w in result.words]
    with pytest.raises(ValueError, match="one image"):
        plot_attention(image, tiny_gpt2.caption([image, image], max_new_tokens=5, return_attention=True))
