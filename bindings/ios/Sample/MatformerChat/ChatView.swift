import SwiftUI

struct ChatView: View {
    let modelPath: String?
    @StateObject private var model = ChatModel()

    var body: some View {
        VStack(alignment: .leading, spacing: 8) {
            VStack(alignment: .leading, spacing: 4) {
                Text("Submodel: \(model.submodel)").font(.headline)
                Text(model.why).font(.caption).foregroundStyle(.secondary).lineLimit(5)
                HStack {
                    Toggle("Low battery", isOn: $model.lowBattery)
                    Toggle("Hot", isOn: $model.hot)
                    Toggle("Memory pressure", isOn: $model.memoryPressure)
                }
                .toggleStyle(.button)
                .font(.caption)
            }
            .padding(.horizontal)

            ScrollViewReader { proxy in
                ScrollView {
                    LazyVStack(alignment: .leading, spacing: 10) {
                        ForEach(model.lines) { line in
                            Text(line.text.isEmpty ? "…" : line.text)
                                .padding(10)
                                .background(line.role == "user" ? Color.accentColor.opacity(0.15) : Color.secondary.opacity(0.1))
                                .clipShape(RoundedRectangle(cornerRadius: 12))
                                .frame(maxWidth: .infinity, alignment: line.role == "user" ? .trailing : .leading)
                                .id(line.id)
                        }
                    }
                    .padding(.horizontal)
                }
                .onChange(of: model.lines.last?.text) { _ in
                    if let last = model.lines.last { proxy.scrollTo(last.id, anchor: .bottom) }
                }
            }

            if !model.stats.isEmpty {
                Text(model.stats).font(.caption2).foregroundStyle(.secondary).padding(.horizontal)
            }
            HStack {
                TextField("Message", text: $model.draft)
                    .textFieldStyle(.roundedBorder)
                    .onSubmit { model.send() }
                Button(model.busy ? "Stop" : "Send") {
                    if model.busy { model.stop() } else { model.send() }
                }
                .buttonStyle(.borderedProminent)
            }
            .padding([.horizontal, .bottom])
        }
        .task { await model.start(modelPath: modelPath) }
    }
}
