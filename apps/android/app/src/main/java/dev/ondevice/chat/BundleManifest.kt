// The manifest.json written by `ondevice export MODEL --app android --format pte -o DIR`
// (schema: app-bundle-manifest.v2; v1 bundles read the same way). Parsed with org.json, which ships with Android.
package dev.ondevice.chat

import org.json.JSONObject
import java.io.File

data class Sampling(
    val temperature: Double, val topK: Int, val topP: Double, val minP: Double,
    val repeatPenalty: Double, val maxTokens: Int,
)

data class BundleManifest(
    val folder: File,
    val manifestVersion: Int,
    val runtime: String,
    val modelFile: File,
    val modelFormat: String,
    val contextLength: Int,
    val chatTemplate: String?,
    val addBos: Boolean,
    val bosToken: String?,
    val eosIds: Set<Int>,
    val stop: List<String>,
    val sampling: Sampling,
    val tokenizerFile: File?,
    val runtimeManifestFile: File?,
    val ramEstimateBytes: Long,
) {
    companion object {
        fun load(folder: File): BundleManifest {
            val json = JSONObject(File(folder, "manifest.json").readText())
            val version = json.getInt("manifest_version")
            require(version in 1..2) { "manifest version $version is newer than this app understands (2)" }
            val model = json.getJSONObject("model")
            val chat = json.getJSONObject("chat")
            val s = json.getJSONObject("sampling")
            val files = json.getJSONArray("files")
            fun fileWithRole(role: String): File? = (0 until files.length()).map { files.getJSONObject(it) }
                .firstOrNull { it.getString("role") == role }?.let { File(folder, it.getString("path")) }
            val eos = chat.getJSONArray("eos_tokens")
            val stop = chat.getJSONArray("stop")
            return BundleManifest(
                folder = folder,
                manifestVersion = version,
                runtime = json.optString("runtime", "executorch"),
                modelFile = File(folder, model.getString("file")),
                modelFormat = model.getString("format"),
                contextLength = model.optInt("recommended_context", model.getInt("context_length")),
                chatTemplate = if (chat.isNull("template")) null else chat.getString("template"),
                addBos = chat.getBoolean("add_bos"),
                bosToken = if (chat.isNull("bos_token")) null else chat.getString("bos_token"),
                eosIds = (0 until eos.length()).map { eos.getJSONObject(it).getInt("id") }.toSet(),
                stop = (0 until stop.length()).map { stop.getString(it) },
                sampling = Sampling(
                    s.getDouble("temperature"), s.getInt("top_k"), s.getDouble("top_p"), s.getDouble("min_p"),
                    s.getDouble("repeat_penalty"), s.optInt("max_tokens", 512),
                ),
                tokenizerFile = fileWithRole("tokenizer"),
                runtimeManifestFile = fileWithRole("runtime_manifest"),
                ramEstimateBytes = json.getJSONObject("ram").getLong("estimate_bytes"),
            )
        }
    }
}
