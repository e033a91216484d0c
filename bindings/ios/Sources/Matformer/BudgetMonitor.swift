import Dispatch
import Foundation
import MatformerFFI

/// What a `BudgetMonitor` did, and why.
public struct BudgetUpdate: Sendable {
    /// What triggered it.
    public enum Cause: Sendable, Equatable {
        /// A session was attached: it gets the current budget.
        case attached
        /// A source reported a change, or `refresh()` / a poll found one.
        case signalsChanged
        /// A memory warning, and the pressure it was mapped to.
        case memoryWarning(MemoryPressure)
    }

    /// What happened to one session.
    public struct Outcome: Sendable {
        /// The session.
        public let session: Session
        /// The plan it switches to (budget updates).
        public let plan: Plan?
        /// The submodel it runs after the update (switches apply at the next token boundary
        /// while generating).
        public let submodel: String
        /// Why the update failed (for example `nothingFits`: the session was then sent to its
        /// smallest submodel).
        public let error: MatformerError?
    }

    public let cause: Cause
    /// The merged readings of every source.
    public let signals: DeviceSignals
    /// One outcome per attached session.
    public let outcomes: [Outcome]

    /// One paragraph for people: the signals, then the first session's plan explanation.
    public var explanation: String {
        var text: String
        switch cause {
        case .attached: text = "Started with \(signals.summary)."
        case .signalsChanged: text = "Device signals changed: \(signals.summary)."
        case .memoryWarning(let p): text = "Memory warning (\(p) pressure): \(signals.summary)."
        }
        if let first = outcomes.first {
            if let plan = first.plan { text += " " + plan.explanation }
            if let error = first.error { text += " " + error.message }
            if case .memoryWarning = cause { text += " Now running \(first.submodel)." }
        }
        return text
    }
}

/// Reads device signals from its sources, maps them with a `BudgetPolicy` and pushes budgets to
/// the attached sessions when they change (and memory warnings as memory pressure). Sources
/// later in the list override earlier ones field by field. Work runs on the monitor's own
/// serial queue; `onUpdate` is called there.
public final class BudgetMonitor: @unchecked Sendable {
    public let policy: BudgetPolicy
    private let sources: [DeviceSignalSource]
    private let pollInterval: Double?
    private let queue = DispatchQueue(label: "matformer.budget-monitor")
    private let clock: @Sendable () -> Double

    // Confined to `queue`.
    private var sessions: [WeakSession] = []
    private var lastSignals: DeviceSignals?
    private var lastWarning: Double?
    private var timer: DispatchSourceTimer?
    private var handler: (@Sendable (BudgetUpdate) -> Void)?

    /// - Parameters:
    ///   - sources: where signals come from; later sources override earlier ones.
    ///   - policy: how signals become budgets and pressure.
    ///   - pollInterval: seconds between readings of the sources while started (available memory
    ///     has no notification on iOS); `nil`: only on events and `refresh()`.
    ///   - clock: seconds, monotonic (tests pass a fake one).
    public init(
        sources: [DeviceSignalSource],
        policy: BudgetPolicy = BudgetPolicy(),
        pollInterval: Double? = 5,
        clock: @escaping @Sendable () -> Double = { Double(DispatchTime.now().uptimeNanoseconds) / 1e9 }
    ) {
        self.sources = sources
        self.policy = policy
        self.pollInterval = pollInterval
        self.clock = clock
    }

    deinit { timer?.cancel() }

    /// Called on the monitor's queue after every update (hop to the main actor to show it). It
    /// must not call the monitor's own methods synchronously (they run on that queue).
    public func onUpdate(_ handler: @escaping @Sendable (BudgetUpdate) -> Void) {
        queue.sync { self.handler = handler }
    }

    /// Starts observing the sources and polling.
    public func start() {
        for source in sources {
            source.startObserving { [weak self] event in self?.handle(event) }
        }
        queue.sync {
            guard timer == nil, let interval = pollInterval else { return }
            let t = DispatchSource.makeTimerSource(queue: queue)
            t.schedule(deadline: .now() + interval, repeating: interval)
            t.setEventHandler { [weak self] in _ = self?.refreshOnQueue(force: false) }
            t.resume()
            timer = t
        }
    }

    /// Stops observing and polling; attached sessions keep their submodel.
    public func stop() {
        sources.forEach { $0.stopObserving() }
        queue.sync {
            timer?.cancel()
            timer = nil
        }
    }

    /// Attaches a session (held weakly) and gives it the current budget at once.
    @discardableResult
    public func attach(_ session: Session) -> BudgetUpdate {
        queue.sync {
            sessions.removeAll { $0.session == nil || $0.session === session }
            sessions.append(WeakSession(session))
            let signals = readSignals()
            lastSignals = policy.quantized(signals)
            return push(.attached, signals, to: [session])
        }
    }

    /// Detaches a session.
    public func detach(_ session: Session) {
        queue.sync { sessions.removeAll { $0.session == nil || $0.session === session } }
    }

    /// Reads the sources now and pushes a new budget to every session if the signals changed
    /// (`force`: even if not). Returns the update, `nil` when nothing changed.
    @discardableResult
    public func refresh(force: Bool = false) -> BudgetUpdate? {
        queue.sync { refreshOnQueue(force: force) }
    }

    /// Handles a memory warning as if a source reported one; returns the update.
    @discardableResult
    public func memoryWarning() -> BudgetUpdate {
        queue.sync { memoryWarningOnQueue() }
    }

    /// The merged readings of every source now.
    public func currentSignals() -> DeviceSignals { readSignals() }

    // MARK: Internals

    private struct WeakSession {
        weak var session: Session?
        init(_ session: Session) { self.session = session }
    }

    private func handle(_ event: DeviceEvent) {
        queue.async { [weak self] in
            guard let self else { return }
            switch event {
            case .signalsChanged: _ = self.refreshOnQueue(force: false)
            case .memoryWarning: _ = self.memoryWarningOnQueue()
            }
        }
    }

    private func readSignals() -> DeviceSignals {
        sources.reduce(DeviceSignals()) { $0.overridden(by: $1.read()) }
    }

    private func liveSessions() -> [Session] {
        sessions.removeAll { $0.session == nil }
        return sessions.compactMap(\.session)
    }

    private func refreshOnQueue(force: Bool) -> BudgetUpdate? {
        let signals = readSignals()
        let quantized = policy.quantized(signals)
        if !force, quantized == lastSignals { return nil }
        lastSignals = quantized
        return push(.signalsChanged, signals, to: liveSessions())
    }

    private func memoryWarningOnQueue() -> BudgetUpdate {
        let now = clock()
        let signals = readSignals()
        lastSignals = policy.quantized(signals)
        let pressure = policy.pressure(for: signals, secondsSinceLastWarning: lastWarning.map { now - $0 })
        lastWarning = now
        let outcomes = liveSessions().map { session -> BudgetUpdate.Outcome in
            var failure: MatformerError?
            do { try session.onMemoryPressure(pressure) } catch { failure = error as? MatformerError }
            return .init(session: session, plan: nil, submodel: session.submodel, error: failure)
        }
        return deliver(BudgetUpdate(cause: .memoryWarning(pressure), signals: signals, outcomes: outcomes))
    }

    private func push(_ cause: BudgetUpdate.Cause, _ signals: DeviceSignals, to targets: [Session]) -> BudgetUpdate {
        let outcomes = targets.map { session -> BudgetUpdate.Outcome in
            let held = session.lastPlan.map { $0.footprintBytes > $0.weightBytes ? $0.footprintBytes - $0.weightBytes : 0 } ?? 0
            let budget = policy.budget(for: signals, heldBytes: held, sessionContext: UInt32(clamping: session.contextLength))
            do {
                let plan = try session.setBudget(budget)
                return .init(session: session, plan: plan, submodel: plan.entry.name, error: nil)
            } catch {
                let failure = error as? MatformerError
                // Nothing fits: the smallest submodel is the best the session can do.
                if case .nothingFits? = failure { try? session.onMemoryPressure(.critical) }
                return .init(session: session, plan: nil, submodel: session.submodel, error: failure)
            }
        }
        return deliver(BudgetUpdate(cause: cause, signals: signals, outcomes: outcomes))
    }

    private func deliver(_ update: BudgetUpdate) -> BudgetUpdate {
        handler?(update)
        return update
    }
}
