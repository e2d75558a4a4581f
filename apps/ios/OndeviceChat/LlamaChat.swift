// Streams a chat reply from the bundle's GGUF with llama.cpp's C API (the `llama` module of llama.cpp's
// XCFramework / Swift package). Sampling defaults come from manifest.json.
import Foundation
import llama

enum LlamaChatError: Error { case load(String), decode(Int32), template }

final class LlamaChat {
    private let model: OpaquePointer
    private let context: OpaquePointer
    private let vocab: OpaquePointer
    let manifest: BundleManifest

    init(bundleFolder: URL) throws {
        manifest = try BundleManifest.load(bundleFolder: bundleFolder)
        llama_backend_init()
        let path = bundleFolder.appendingPathComponent(manifest.model.file).path
        guard let m = llama_model_load_from_file(path, llama_model_default_params()) else {
            throw LlamaChatError.load("cannot load \(path)")
        }
        var cparams = llama_context_default_params()
        cparams.n_ctx = UInt32(manifest.model.recommended_context ?? min(manifest.model.context_length, 2048))
        guard let c = llama_init_from_model(m, cparams) else { throw LlamaChatError.load("cannot create a context") }
        model = m
        context = c
        vocab = llama_model_get_vocab(m)
    }

    deinit {
        llama_free(context)
        llama_model_free(model)
    }

    /// The prompt text: the model's chat template (ChatML for SmolLM2) applied by llama.cpp.
    func prompt(for messages: [(role: String, content: String)]) throws -> String {
        let template = llama_model_chat_template(model, nil)
        var cMessages = messages.map { llama_chat_message(role: strdup($0.role), content: strdup($0.content)) }
        defer { cMessages.forEach { free(UnsafeMutableRawPointer(mutating: $0.role)); free(UnsafeMutableRawPointer(mutating: $0.content)) } }
        var buffer = [CChar](repeating: 0, count: 4096 + 2 * messages.reduce(0) { $0 + $1.content.utf8.count })
        let n = llama_chat_apply_template(template, &cMessages, cMessages.count, true, &buffer, Int32(buffer.count))
        guard n > 0, Int(n) <= buffer.count else { throw LlamaChatError.template }
        return String(decoding: buffer[0..<Int(n)].map { UInt8(bitPattern: $0) }, as: UTF8.self)
    }

    /// Generate a reply, calling `onPiece` with each text piece as it is decoded. Return false to stop.
    func reply(to messages: [(role: String, content: String)], onPiece: (String) -> Bool) throws {
        let text = try prompt(for: messages)
        let s = manifest.sampling
        llama_memory_clear(llama_get_memory(context), true)  // a fresh conversation each call (simple sample)
        var tokens = [llama_token](repeating: 0, count: text.utf8.count + 8)
        let nPrompt = llama_tokenize(vocab, text, Int32(text.utf8.count), &tokens, Int32(tokens.count),
                                     manifest.chat.add_bos, true)  // parse_special: chat markup -> single tokens
        guard nPrompt > 0 else { throw LlamaChatError.template }
        tokens = Array(tokens[0..<Int(nPrompt)])

        let chain = llama_sampler_chain_init(llama_sampler_chain_default_params())!
        defer { llama_sampler_free(chain) }
        llama_sampler_chain_add(chain, llama_sampler_init_penalties(64, Float(s.repeat_penalty), 0, 0))
        llama_sampler_chain_add(chain, llama_sampler_init_top_k(Int32(s.top_k)))
        llama_sampler_chain_add(chain, llama_sampler_init_top_p(Float(s.top_p), 1))
        llama_sampler_chain_add(chain, llama_sampler_init_min_p(Float(s.min_p), 1))
        llama_sampler_chain_add(chain, llama_sampler_init_temp(Float(s.temperature)))
        llama_sampler_chain_add(chain, llama_sampler_init_dist(LLAMA_DEFAULT_SEED))

        var batch = llama_batch_get_one(&tokens, Int32(tokens.count))
        var pending = [UInt8]()  // bytes of an unfinished UTF-8 character
        for _ in 0..<(s.max_tokens ?? 512) {
            let status = llama_decode(context, batch)
            guard status == 0 else { throw LlamaChatError.decode(status) }
            var next = llama_sampler_sample(chain, context, -1)
            if llama_vocab_is_eog(vocab, next) { break }  // <|im_end|>, <|endoftext|>: manifest.chat.stop
            var piece = [CChar](repeating: 0, count: 64)
            let n = llama_token_to_piece(vocab, next, &piece, Int32(piece.count), 0, false)
            pending += piece[0..<Int(max(n, 0))].map { UInt8(bitPattern: $0) }
            if let text = String(validatingUTF8: pending.map { CChar(bitPattern: $0) } + [0]) {
                pending.removeAll()
                if !onPiece(text) { break }
            }
            batch = llama_batch_get_one(&next, 1)
        }
    }
}
