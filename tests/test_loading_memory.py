"""Loading takes the file's tensors as the parameters (no second copy): bit for bit, ties kept."""

import tokenizers
import torch
import transformers
from safetensors.torch import load_file

from llmcli import checkpoint, convert


def hf_llama(path, tied: bool):
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, bos_token_id=1, eos_token_id=2,
                                   tie_word_embeddings=tied)  # fmt: skip
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).float()
    model.save_pretrained(path, max_shard_size="20KB")  # several shards
    words = {"<unk>": 0, "<s>": 1, "</s>": 2} | {f"w{i}": i for i in range(3, 64)}
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(words, unk_token="<unk>"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tok.save(str(path / "tokenizer.json"))
    return model


def test_a_loaded_model_holds_the_files_tensors_bit_for_bit_with_ties_kept(tmp_path):
    for tied in (True, False):
        src, dst = tmp_path / f"hf{tied}", tmp_path / f"ours{tied}"
        hf = hf_llama(src, tied)
        assert len(list(src.glob("*.safetensors"))) > 1
        converted = convert.convert(src)
        convert.save(converted, dst)
        loaded = checkpoint.load_model(dst)
        model = loaded.model
        assert (model.lm_head.weight is model.decoder.embed_tokens.weight) == tied
        assert model.decoder.embed_tokens.weight.data_ptr() != model.lm_head.weight.data_ptr() or tied
        on_file = load_file(dst / checkpoint.WEIGHTS_FILE)
        mine = checkpoint.model_tensors(model)
        assert set(mine) == set(on_file)
        for name, t in on_file.items():
            assert mine[name].dtype == t.dtype and torch.equal(mine[name], t), name
        theirs = hf.state_dict()
        assert torch.equal(model.decoder.embed_tokens.weight, theirs["model.embed_tokens.weight"])
        assert torch.equal(model.lm_head.weight, theirs["lm_head.weight"])
        # the parameters are the file's tensors, not copies of them; no two share memory
        pointers = [p.data_ptr() for p in model.parameters()]
        assert len(set(pointers)) == len(pointers)


def test_tensors_of_another_dtype_are_copied_in_and_parameters_stay_the_same_objects(tmp_path):
    src = tmp_path / "hf"
    hf_llama(src, True)
    model = convert.convert_weights(src)
    half = {n: t.half() for n, t in checkpoint.model_tensors(model).items()}
    params = dict(model.named_parameters())
    checkpoint.load_state_into(model, half, "test")
    assert all(p is params[n] and p.dtype == torch.float32 for n, p in model.named_parameters())
    assert all(torch.equal(p, half[n].float()) for n, p in model.named_parameters())
    assert model.lm_head.weight is model.decoder.embed_tokens.weight
