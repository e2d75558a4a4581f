// Streams a chat reply from the bundle's ExecuTorch program. The .pte exported by ondevice has one method,
// forward(tokens (1, S) int64, input_pos (1,) int64) -> logits (1, S, vocab), with a static KV cache inside;
// prefill goes in chunks of at most max_chunk tokens (from the runtime manifest beside the .pte).
// Tokenization: the bundle's tokenizer.json through DJL's HuggingFace tokenizers (Android build).
package dev.ondevice.chat

import ai.djl.huggingface.tokenizers.HuggingFaceTokenizer
import org.json.JSONObject
import org.pytorch.executorch.EValue
import org.pytorch.executorch.Module
import org.pytorch.executorch.Tensor
import kotlin.math.exp
import kotlin.random.Random

class PteChat(private val manifest: BundleManifest) : AutoCloseable {
    private val module: Module = Module.load(manifest.modelFile.absolutePath)
    private val tokenizer: HuggingFaceTokenizer = HuggingFaceTokenizer.newInstance(
        requireNotNull(manifest.tokenizerFile) { "the bundle has no tokenizer" }.toPath(),
        mapOf("addSpecialTokens" to "false"),
    )
    private val runtime = JSONObject(requireNotNull(manifest.runtimeManifestFile).readText())
    private val maxChunk = runtime.getInt("max_chunk")
    private val maxSeq = runtime.getInt("max_seq_len")
    private val random = Random(System.nanoTime())

    init {
        require(manifest.modelFormat == "pte") { "PteChat needs a bundle exported with --format pte" }
    }

    /** ChatML, the template of SmolLM2/Qwen2 (a .pte carries no template; the manifest does). */
    fun prompt(messages: List<Pair<String, String>>): String {
        val template = manifest.chatTemplate ?: error("the model has no chat template")
        require("<|im_start|>" in template) { "this sample formats ChatML only; port the manifest's Jinja template" }
        val sb = StringBuilder()
        for ((role, content) in messages) sb.append("<|im_start|>").append(role).append('\n').append(content).append("<|im_end|>\n")
        return sb.append("<|im_start|>assistant\n").toString()
    }

    private fun forward(tokens: LongArray, position: Long): FloatArray {
        val input = Tensor.fromBlob(tokens, longArrayOf(1, tokens.size.toLong()))
        val pos = Tensor.fromBlob(longArrayOf(position), longArrayOf(1))
        val logits = module.forward(EValue.from(input), EValue.from(pos))[0].toTensor().dataAsFloatArray
        val vocab = logits.size / tokens.size
        return logits.copyOfRange(logits.size - vocab, logits.size)  // the last position's logits
    }

    /** Temperature, top-k, top-p, min-p (the manifest's recommended values), greedy at temperature 0. */
    private fun sample(logits: FloatArray): Int {
        val s = manifest.sampling
        if (s.temperature <= 0.0) return logits.indices.maxBy { logits[it] }
        val k = if (s.topK > 0) minOf(s.topK, logits.size) else logits.size
        val top = logits.indices.sortedByDescending { logits[it] }.take(k)
        val best = logits[top[0]]
        val probs = top.map { exp((logits[it] - best) / s.temperature) }
        val total = probs.sum()
        var cumulative = 0.0
        val kept = ArrayList<Pair<Int, Double>>()
        for ((i, id) in top.withIndex()) {
            val p = probs[i] / total
            if (p < s.minP * probs[0] / total && kept.isNotEmpty()) break
            kept.add(id to p)
            cumulative += p
            if (cumulative >= s.topP) break
        }
        var r = random.nextDouble() * kept.sumOf { it.second }
        for ((id, p) in kept) { r -= p; if (r <= 0) return id }
        return kept.last().first
    }

    /** Generate a reply; `onPiece` gets each decoded text piece and returns false to stop early. */
    fun reply(messages: List<Pair<String, String>>, onPiece: (String) -> Boolean) {
        val ids = tokenizer.encode(prompt(messages)).ids.toMutableList()
        require(ids.size < maxSeq) { "the prompt (${ids.size} tokens) does not fit in $maxSeq positions" }
        var logits = FloatArray(0)
        var position = 0L
        for (chunk in ids.chunked(maxChunk)) {  // prefill
            logits = forward(chunk.toLongArray(), position)
            position += chunk.size
        }
        val generated = ArrayList<Long>()
        var emitted = ""
        while (generated.size < manifest.sampling.maxTokens && position < maxSeq) {
            val next = sample(logits)
            if (next in manifest.eosIds) break
            generated.add(next.toLong())
            val text = tokenizer.decode(generated.toLongArray())
            if (!text.endsWith("\uFFFD") && text.length > emitted.length) {  // whole characters only
                if (!onPiece(text.substring(emitted.length))) break
                emitted = text
            }
            logits = forward(longArrayOf(next.toLong()), position)
            position += 1
        }
    }

    override fun close() {
        module.destroy()
        tokenizer.close()
    }
}
