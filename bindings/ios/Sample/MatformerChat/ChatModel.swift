import Combine
import Foundation
import Matformer

/// The chat screen's state: one engine, one session, a budget monitor fed by the iPhone's
/// signals with a simulation layer on top.
@MainActor
final class ChatModel: ObservableObject {
    struct Line: Identifiable {
        let id = UUID()
        let role: String
        var text: String
    }

    @Published var lines: [Line] = []
    @Published var draft = ""
    @Published private(set) var submodel = "…"
    @Published private(set) var why = "Opening the model…"
    @Published private(set) var stats = ""
    @Published private(set) var busy = false
    @Published var lowBattery = false { didSet { simulate() } }
    @Published var hot = false { didSet { simulate() } }
    @Published var memoryPressure = false {
        didSet {
            simulate()
            if memoryPressure { simulated.simulateMemoryWarning() }
        }
    }

    private var engine: Engine?
    private var session: Session?
    private var monitor: BudgetMonitor?
    /// Readings that override the system's while a simulation is on.
    private let simulated = ManualSignalSource()
    private var largestFootprint: UInt64 = 0
    private var generation: Task<Void, Never>?

    func start(modelPath: String?) async {
        guard engine == nil else { return }
        guard let modelPath else {
            why = "No model.matf in the app bundle."
            return
        }
        do {
            let engine = try await Engine.open(path: modelPath)
            let session = try engine.session(SessionOptions(systemPrompt: "You are a helpful assistant."))
            largestFootprint = try engine.select(DeviceBudget()).footprintBytes
            let monitor = BudgetMonitor(sources: [SystemSignalSource(), simulated])
            monitor.onUpdate { [weak self] update in
                let name = update.outcomes.first?.submodel ?? "?"
                let explanation = update.explanation
                Task { @MainActor in
                    self?.submodel = name
                    self?.why = explanation
                }
            }
            monitor.start()
            let first = monitor.attach(session)
            submodel = first.outcomes.first?.submodel ?? session.submodel
            why = first.explanation
            (self.engine, self.session, self.monitor) = (engine, session, monitor)
        } catch {
            why = error.localizedDescription
        }
    }

    func send() {
        let text = draft.trimmingCharacters(in: .whitespacesAndNewlines)
        guard !text.isEmpty, let session, !busy else { return }
        draft = ""
        lines.append(Line(role: "user", text: text))
        lines.append(Line(role: "assistant", text: ""))
        let index = lines.count - 1
        busy = true
        generation = Task {
            do {
                for try await piece in session.generate(text, options: GenerateOptions(maxTokens: 512)) {
                    lines[index].text += piece
                    submodel = session.submodel // switches land between two tokens
                }
            } catch is CancellationError {
            } catch {
                lines[index].text += "\n[\(error.localizedDescription)]"
            }
            if let c = session.lastCompletion {
                let switches = c.stats.switches.map { "\($0.from)→\($0.to) at token \($0.atToken) (\($0.reason))" }
                stats = String(format: "%@ · %.0f tok/s · %@", c.stats.submodel, c.stats.decodeTokensPerS, "\(c.finishReason)")
                    + (switches.isEmpty ? "" : " · " + switches.joined(separator: ", "))
            }
            busy = false
        }
    }

    /// Cancels the answer being written: the native generation stops within one token.
    func stop() { generation?.cancel() }

    /// "Low battery": 8%, unplugged, Low Power Mode. "Hot": thermal state critical. "Memory
    /// pressure": a memory warning, and half the memory the largest submodel needs.
    private func simulate() {
        simulated.set(DeviceSignals(
            availableMemoryBytes: memoryPressure ? largestFootprint / 2 : nil,
            batteryLevel: lowBattery ? 0.08 : nil,
            batteryState: lowBattery ? .unplugged : nil,
            lowPowerMode: lowBattery ? true : nil,
            thermalState: hot ? .critical : nil
        ))
    }
}
