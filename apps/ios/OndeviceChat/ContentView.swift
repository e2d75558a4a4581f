// A minimal SwiftUI chat screen: the bundle folder is added to the app target as a folder reference
// named "model-bundle" (the output of `ondevice export MODEL --app ios -o model-bundle`).
import SwiftUI

@MainActor
final class ChatViewModel: ObservableObject {
    @Published var transcript: [(role: String, content: String)] = []
    @Published var status = "loading model…"
    private var chat: LlamaChat?

    func load() {
        Task.detached {
            do {
                guard let folder = Bundle.main.url(forResource: "model-bundle", withExtension: nil) else {
                    throw NSError(domain: "ondevice", code: 2, userInfo: [NSLocalizedDescriptionKey: "model-bundle is missing"])
                }
                let chat = try LlamaChat(bundleFolder: folder)
                await MainActor.run {
                    self.chat = chat
                    self.status = "\(chat.manifest.model.name) · ~\(chat.manifest.ram.estimate_bytes / 1_000_000) MB"
                }
            } catch {
                await MainActor.run { self.status = "error: \(error.localizedDescription)" }
            }
        }
    }

    func send(_ text: String) {
        guard let chat else { return }
        transcript.append((role: "user", content: text))
        transcript.append((role: "assistant", content: ""))
        let history = Array(transcript.dropLast())
        Task.detached {
            try? chat.reply(to: history) { piece in
                DispatchQueue.main.async { self.transcript[self.transcript.count - 1].content += piece }
                return true
            }
        }
    }
}

struct ContentView: View {
    @StateObject private var model = ChatViewModel()
    @State private var input = ""

    var body: some View {
        VStack {
            Text(model.status).font(.caption).foregroundStyle(.secondary)
            ScrollView {
                ForEach(Array(model.transcript.enumerated()), id: \.offset) { _, message in
                    Text(message.content)
                        .padding(8)
                        .background(message.role == "user" ? Color.blue.opacity(0.15) : Color.gray.opacity(0.12))
                        .clipShape(RoundedRectangle(cornerRadius: 8))
                        .frame(maxWidth: .infinity, alignment: message.role == "user" ? .trailing : .leading)
                }
            }
            HStack {
                TextField("Message", text: $input).textFieldStyle(.roundedBorder)
                Button("Send") { model.send(input); input = "" }.disabled(input.isEmpty)
            }
        }
        .padding()
        .onAppear { model.load() }
    }
}

@main
struct OndeviceChatApp: App {
    var body: some Scene { WindowGroup { ContentView() } }
}
