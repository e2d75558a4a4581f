// The manifest.json written by `ondevice export MODEL --app ios -o DIR` (schema: app-bundle-manifest.v2;
// version 1 bundles read the same way).
// Only the fields the app needs are decoded; unknown fields are ignored, so newer minor additions load fine.
import Foundation

struct BundleManifest: Decodable {
    struct Model: Decodable {
        let name: String
        let architecture: String
        let format: String          // "gguf" for llama.cpp, "mlpackage" for Core ML
        let file: String            // relative to the bundle folder (a folder for "mlpackage")
        let quantization: String
        let context_length: Int
        let recommended_context: Int?
    }
    struct EosToken: Decodable { let id: Int; let text: String }
    struct Chat: Decodable {
        let template: String?
        let bos_token: String?
        let add_bos: Bool
        let eos_tokens: [EosToken]
        let stop: [String]
    }
    struct Sampling: Decodable {
        let temperature: Double
        let top_k: Int
        let top_p: Double
        let min_p: Double
        let repeat_penalty: Double
        let max_tokens: Int?
    }
    struct Ram: Decodable { let estimate_bytes: Int; let context: Int; let device: String; let fits: Bool }

    let manifest_version: Int
    let app: String
    let runtime: String?
    let model: Model
    let chat: Chat
    let sampling: Sampling
    let ram: Ram

    static func load(bundleFolder: URL) throws -> BundleManifest {
        let data = try Data(contentsOf: bundleFolder.appendingPathComponent("manifest.json"))
        let manifest = try JSONDecoder().decode(BundleManifest.self, from: data)
        guard (1...2).contains(manifest.manifest_version) else {
            throw NSError(domain: "ondevice", code: 1, userInfo: [NSLocalizedDescriptionKey:
                "manifest version \(manifest.manifest_version) is newer than this app understands (2)"])
        }
        guard manifest.model.format == "gguf" else {  // this sample drives llama.cpp; see README for Core ML
            throw NSError(domain: "ondevice", code: 2, userInfo: [NSLocalizedDescriptionKey:
                "this sample runs GGUF bundles; \(manifest.model.format) needs the Core ML path (apps/ios/README.md)"])
        }
        return manifest
    }
}
