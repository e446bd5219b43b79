"""A checkpoint that also reads images (LLaVA here; Mistral 3, Qwen2.5-VL and their kind load the
same way): its text stack is pruned, its vision tower and processor are kept, and the written
folder loads with AutoModelForImageTextToText and computes, on text and on an image, what the
original computes with the dropped blocks skipped."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import (
    AutoModelForImageTextToText,
    AutoProcessor,
    CLIPImageProcessor,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
)

from sglp_llm.cli import main
from sglp_llm.model.blocks import find_decoder_blocks
from tiny_models import COMMON, tiny_tokenizer

IMAGE_TOKEN = 3  # the tokenizer's <unk>: a word-level tokenizer has no image token of its own
FAST = ["--seq-len", "16", "--n-samples", "8", "--batch-size", "4", "--cka-minibatch-tokens", "16", "--no-progress"]


@pytest.fixture(scope="module")
def llava_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-llava")
    torch.manual_seed(0)
    config = LlavaConfig(
        text_config={**COMMON, "model_type": "llama", "num_hidden_layers": 6},
        vision_config=dict(model_type="clip_vision_model", hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                           num_attention_heads=2, image_size=16, patch_size=8, projection_dim=16),
        image_token_index=IMAGE_TOKEN,
    )
    model = LlavaForConditionalGeneration(config).eval()
    with torch.no_grad():  # every block really changes the hidden states
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    model.save_pretrained(folder)
    LlavaProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16}),
                   tokenizer=tiny_tokenizer(), patch_size=8, vision_feature_select_strategy="default",
                   image_token="<unk>").save_pretrained(folder)
    return folder


def _skipping(model, blocks):
    layers = find_decoder_blocks(model).layers
    return [layers[i].register_forward_hook(lambda m, a, k, o: a[0] if a else k["hidden_states"], with_kwargs=True)
            for i in blocks]


def test_a_model_that_reads_images_is_pruned_in_its_text_stack_and_keeps_its_vision(llava_dir, text_file, tmp_path,
                                                                                   capsys):
    out = tmp_path / "pruned"
    assert main(["prune", "--model", str(llava_dir), "--drop", "2", "--dataset", str(text_file),
                 "--output", str(out), *FAST]) == 0
    printed = capsys.readouterr()
    assert "LlavaForConditionalGeneration also reads images: pruning chooses its decoder blocks on text only" in printed.err
    assert "(load it with AutoModelForImageTextToText.from_pretrained and AutoProcessor)" in printed.out
    dropped = json.loads((out / "sglp_report.json").read_text())["dropped"]
    assert len(dropped) == 2

    original = LlavaForConditionalGeneration.from_pretrained(llava_dir).eval()
    pruned = AutoModelForImageTextToText.from_pretrained(out).eval()
    assert type(pruned) is LlavaForConditionalGeneration
    assert len(find_decoder_blocks(pruned).layers) == pruned.config.text_config.num_hidden_layers == 4
    kept_whole = {k: v for k, v in original.state_dict().items() if "language_model" not in k}
    assert all(torch.equal(pruned.state_dict()[k], v) for k, v in kept_whole.items())
    processor = AutoProcessor.from_pretrained(out)
    assert type(processor) is LlavaProcessor and processor.image_processor.crop_size == {"height": 16, "width": 16}

    generator = torch.Generator().manual_seed(1)
    text = {"input_ids": torch.randint(4, COMMON["vocab_size"], (2, 12), generator=generator)}
    # an image's four patches, then text: the vision tower's features enter the pruned text stack
    image = {"input_ids": torch.tensor([[1, *[IMAGE_TOKEN] * 4, 10, 11, 12, 13]]),
             "pixel_values": torch.randn(1, 3, 16, 16, generator=generator)}
    for inputs in (text, image):
        hooks = _skipping(original, dropped)
        with torch.no_grad():
            expected = original(**inputs).logits
            for hook in hooks:
                hook.remove()
            assert not torch.allclose(original(**inputs).logits, expected)  # the skipped blocks mattered
            torch.testing.assert_close(pruned(**inputs).logits, expected, rtol=1e-5, atol=1e-5)

    # the card says how to load it, and still does once an evaluation is recorded in it
    assert main(["eval", str(out), "--dataset", str(text_file), "--max-length", "16", "--update-card", "--no-progress"]) == 0
    card = (out / "README.md").read_text()
    assert "pipeline_tag: image-text-to-text" in card and "| perplexity |" in card
    assert "its decoder blocks were chosen on text only, and its vision tower and projector are unchanged" in card
    assert 'model = AutoModelForImageTextToText.from_pretrained("<path-or-repo-id>", dtype="auto")' in card
    assert 'processor = AutoProcessor.from_pretrained("<path-or-repo-id>")' in card


def test_eval_and_heal_read_a_model_that_reads_images(llava_dir, text_file, tmp_path):
    assert main(["eval", str(llava_dir), "--dataset", str(text_file), "--max-length", "16",
                 "--output-json", str(tmp_path / "eval.json"), "--no-progress"]) == 0
    assert json.loads((tmp_path / "eval.json").read_text())["perplexity"]["perplexity"] > 1
    out = tmp_path / "healed"
    assert main(["heal", str(llava_dir), "--teacher", "none", "--dataset", str(text_file), "--seq-len", "16",
                 "--steps", "2", "--batch-size", "2", "--merge", "--output", str(out), "--no-progress"]) == 0
    assert type(AutoModelForImageTextToText.from_pretrained(out)) is LlavaForConditionalGeneration
    assert type(AutoProcessor.from_pretrained(out)) is LlavaProcessor
    assert "pipeline_tag: image-text-to-text" in (out / "README.md").read_text()
    # the adapter alone loads over the base model as its card shows (peft's Auto classes build causal LMs)
    adapter = tmp_path / "adapter"
    assert main(["heal", str(llava_dir), "--teacher", "none", "--dataset", str(text_file), "--seq-len", "16",
                 "--steps", "2", "--batch-size", "2", "--output", str(adapter), "--no-progress"]) == 0
    card = (adapter / "README.md").read_text()
    assert f'base = AutoModelForImageTextToText.from_pretrained("{llava_dir}", dtype="auto")' in card
    from peft import PeftModel

    healed = PeftModel.from_pretrained(AutoModelForImageTextToText.from_pretrained(llava_dir), adapter)
    assert type(healed.get_base_model()) is LlavaForConditionalGeneration


def test_blocks_on_disk_read_a_checkpoint_saved_under_its_older_names(llava_dir, text_file, tmp_path):
    """transformers writes LLaVA's weights under their older names (`language_model.model.layers`)
    and renames them on load; read block by block from disk under the model's names, the prune
    equals the prune of the model loaded whole, and nothing in the source folder changes."""
    from safetensors.torch import load_file

    before = {f.name: f.read_bytes() for f in llava_dir.iterdir()}
    assert any(k.startswith("language_model.model.layers.") for k in load_file(llava_dir / "model.safetensors"))
    outs = {}
    for name, flags in {"whole": [], "disk": ["--offload", "sequential", "--blocks-on-disk"]}.items():
        outs[name] = tmp_path / name
        assert main(["prune", "--model", str(llava_dir), "--drop", "2", "--dataset", str(text_file),
                     "--output", str(outs[name]), *flags, *FAST]) == 0
    reports = {k: json.loads((v / "sglp_report.json").read_text()) for k, v in outs.items()}
    assert reports["disk"]["dropped"] == reports["whole"]["dropped"]
    whole, disk = (AutoModelForImageTextToText.from_pretrained(outs[k]).state_dict() for k in ("whole", "disk"))
    assert whole.keys() == disk.keys() and all(torch.equal(whole[k], disk[k]) for k in whole)
    assert {f.name: f.read_bytes() for f in llava_dir.iterdir()} == before


def test_gemma3_reads_images_though_it_loads_as_a_causal_lm():
    """Gemma 3 (and Llama 4) build with AutoModelForCausalLM too: they load so, and still keep
    their processor and say they read images; a text model records nothing."""
    from transformers import AutoModelForCausalLM, Gemma3Config, Gemma3TextConfig, LlamaConfig

    from sglp_llm.model.auto_class import auto_model_class, images_record, reads_images
    from sglp_llm.output.modelcard import render_model_card
    from sglp_llm.plan import PruningPlan

    assert auto_model_class(Gemma3Config()) is AutoModelForCausalLM and reads_images(Gemma3Config())
    assert auto_model_class(LlavaConfig()) is AutoModelForImageTextToText and reads_images(LlavaConfig())
    assert not reads_images(Gemma3TextConfig()) and not reads_images(LlamaConfig())
    assert images_record(LlamaConfig(), None) is None
    assert images_record(Gemma3Config(), tiny_tokenizer()) == {"loads_with": "AutoModelForCausalLM", "processor": False}
    plan = PruningPlan(num_blocks=4, layers_path="model.language_model.layers", cka=[[1.0] * 4] * 4, segments=[[0, 1, 2, 3]],
                       scores=[None] * 4, keep_per_segment=[3], dropped=[2], kept=[0, 1, 3], n_tokens=8, n_batches=1,
                       config={"drop": 1}, extra={"images": {"loads_with": "AutoModelForCausalLM", "processor": True}})
    card = render_model_card(plan, base_model="google/gemma-3-4b-pt")
    assert 'model = AutoModelForCausalLM.from_pretrained("<path-or-repo-id>", dtype="auto")' in card
    assert 'processor = AutoProcessor.from_pretrained("<path-or-repo-id>")' in card
    assert "pipeline_tag: image-text-to-text" in card and "lm_eval --model hf" in card
    assert "its decoder blocks were chosen on text only" in card
