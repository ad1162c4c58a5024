namespace MoeRagInject.Model;

/// <summary>One expert's SiLU-gated MLP: out = Down · (silu(Gate · x) ⊙ (Up · x)). Mixtral calls them w1, w3, w2.</summary>
public sealed record ExpertWeights(TensorView Gate, TensorView Up, TensorView Down);

public sealed record LayerWeights(
    TensorView InputNorm,
    TensorView QProj,
    TensorView KProj,
    TensorView VProj,
    TensorView OProj,
    TensorView PostAttentionNorm,
    TensorView Router,
    ExpertWeights[] Experts);

/// <summary>The tensors of a Mixtral checkpoint, resolved by name and checked against the config's shapes.</summary>
public sealed record MixtralWeights(TensorView Embedding, LayerWeights[] Layers, TensorView FinalNorm, TensorView LmHead)
{
    /// <summary>
    /// Accepts the per-expert layout (<c>block_sparse_moe.experts.{e}.w1/w2/w3</c>, as Mixtral checkpoints ship) and the fused
    /// layout of transformers 5 (<c>mlp.experts.gate_up_proj</c> [E, 2I, H] with the gate half first, <c>mlp.experts.down_proj</c> [E, H, I]).
    /// </summary>
    public static unsafe MixtralWeights Resolve(Checkpoint checkpoint, ModelConfig c)
    {
        int h = c.HiddenSize, inter = c.IntermediateSize, q = c.NumHeads * c.HeadDim, kv = c.NumKvHeads * c.HeadDim;
        var layers = new LayerWeights[c.NumLayers];
        for (var l = 0; l < c.NumLayers; l++)
        {
            var p = $"model.layers.{l}.";
            TensorView router;
            var experts = new ExpertWeights[c.NumExperts];
            if (checkpoint.Contains(p + "block_sparse_moe.gate.weight"))
            {
                router = checkpoint.Get(p + "block_sparse_moe.gate.weight", c.NumExperts, h);
                for (var e = 0; e < c.NumExperts; e++)
                {
                    var ep = $"{p}block_sparse_moe.experts.{e}.";
                    experts[e] = new ExpertWeights(
                        checkpoint.Get(ep + "w1.weight", inter, h),
                        checkpoint.Get(ep + "w3.weight", inter, h),
                        checkpoint.Get(ep + "w2.weight", h, inter));
                }
            }
            else if (checkpoint.Contains(p + "mlp.gate.weight"))
            {
                router = checkpoint.Get(p + "mlp.gate.weight", c.NumExperts, h);
                var gateUp = checkpoint.Get(p + "mlp.experts.gate_up_proj", c.NumExperts, 2 * inter, h);
                var down = checkpoint.Get(p + "mlp.experts.down_proj", c.NumExperts, h, inter);
                for (var e = 0; e < c.NumExperts; e++)
                {
                    experts[e] = new ExpertWeights(
                        Slice(gateUp, $"{gateUp.Name}[{e}].gate", (long)e * 2 * inter * h, [inter, h]),
                        Slice(gateUp, $"{gateUp.Name}[{e}].up", ((long)e * 2 * inter + inter) * h, [inter, h]),
                        Slice(down, $"{down.Name}[{e}]", (long)e * h * inter, [h, inter]));
                }
            }
            else
            {
                throw new InvalidDataException($"{checkpoint.Source}: layer {l} has neither block_sparse_moe.gate.weight nor mlp.gate.weight");
            }
            layers[l] = new LayerWeights(
                checkpoint.Get(p + "input_layernorm.weight", h),
                checkpoint.Get(p + "self_attn.q_proj.weight", q, h),
                checkpoint.Get(p + "self_attn.k_proj.weight", kv, h),
                checkpoint.Get(p + "self_attn.v_proj.weight", kv, h),
                checkpoint.Get(p + "self_attn.o_proj.weight", h, q),
                checkpoint.Get(p + "post_attention_layernorm.weight", h),
                router,
                experts);
        }
        var embedding = checkpoint.Get("model.embed_tokens.weight", c.VocabSize, h);
        var lmHead = checkpoint.Contains("lm_head.weight") ? checkpoint.Get("lm_head.weight", c.VocabSize, h)
            : c.TieWordEmbeddings ? embedding
            : throw new InvalidDataException($"{checkpoint.Source}: tensor \"lm_head.weight\" not found and tie_word_embeddings is false");
        return new MixtralWeights(embedding, layers, checkpoint.Get("model.norm.weight", h), lmHead);
    }

    private static unsafe TensorView Slice(TensorView whole, string name, long elementOffset, int[] shape)
    {
        var bytes = (long)shape[0] * shape[1] * whole.DType.ByteSize();
        return new TensorView(name, whole.DType, shape, whole.Pointer + elementOffset * whole.DType.ByteSize(), bytes);
    }
}

/// <summary>Tensor names and shapes of the per-expert Mixtral layout (what dummy weights are built with).</summary>
public static class MixtralWeightNames
{
    /// <summary>Each tensor's number in <see cref="Expected"/> order (the tensor argument of dummy values) and whether it is a norm.</summary>
    public static Dictionary<string, (int Index, bool IsNorm)> Numbers(ModelConfig c)
    {
        var numbers = new Dictionary<string, (int, bool)>(StringComparer.Ordinal);
        var i = 0;
        foreach (var (name, _, isNorm) in Expected(c)) numbers[name] = (i++, isNorm);
        return numbers;
    }

    public static IEnumerable<(string Name, int[] Shape, bool IsNorm)> Expected(ModelConfig c)
    {
        int h = c.HiddenSize, inter = c.IntermediateSize, q = c.NumHeads * c.HeadDim, kv = c.NumKvHeads * c.HeadDim;
        yield return ("model.embed_tokens.weight", [c.VocabSize, h], false);
        for (var l = 0; l < c.NumLayers; l++)
        {
            var p = $"model.layers.{l}.";
            yield return (p + "input_layernorm.weight", [h], true);
            yield return (p + "self_attn.q_proj.weight", [q, h], false);
            yield return (p + "self_attn.k_proj.weight", [kv, h], false);
            yield return (p + "self_attn.v_proj.weight", [kv, h], false);
            yield return (p + "self_attn.o_proj.weight", [h, q], false);
            yield return (p + "post_attention_layernorm.weight", [h], true);
            yield return (p + "block_sparse_moe.gate.weight", [c.NumExperts, h], false);
            for (var e = 0; e < c.NumExperts; e++)
            {
                var ep = $"{p}block_sparse_moe.experts.{e}.";
                yield return (ep + "w1.weight", [inter, h], false);
                yield return (ep + "w3.weight", [inter, h], false);
                yield return (ep + "w2.weight", [h, inter], false);
            }
        }
        yield return ("model.norm.weight", [h], true);
        yield return ("lm_head.weight", [c.VocabSize, h], false);
    }
}
