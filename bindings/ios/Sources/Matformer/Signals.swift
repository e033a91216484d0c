import Foundation
import MatformerFFI

/// The battery's charging state (`UIDevice.BatteryState`).
public enum BatteryState: Sendable, Equatable {
    case unknown
    case unplugged
    case charging
    case full
}

/// What the device reports right now; `nil` fields are unknown (no constraint). Platform-free:
/// the iOS readings come from `SystemSignalSource`, tests and simulations use
/// `ManualSignalSource`.
public struct DeviceSignals: Sendable, Equatable {
    /// Memory the process may still allocate, bytes (`os_proc_available_memory()`).
    public var availableMemoryBytes: UInt64?
    /// Battery charge, 0 to 1 (`UIDevice.batteryLevel`; its -1 "unknown" is `nil`).
    public var batteryLevel: Float?
    /// Charging state (`UIDevice.batteryState`).
    public var batteryState: BatteryState?
    /// Low Power Mode (`ProcessInfo.isLowPowerModeEnabled`).
    public var lowPowerMode: Bool?
    /// Thermal state (`ProcessInfo.thermalState`).
    public var thermalState: ThermalState?

    public init(
        availableMemoryBytes: UInt64? = nil,
        batteryLevel: Float? = nil,
        batteryState: BatteryState? = nil,
        lowPowerMode: Bool? = nil,
        thermalState: ThermalState? = nil
    ) {
        self.availableMemoryBytes = availableMemoryBytes
        self.batteryLevel = batteryLevel
        self.batteryState = batteryState
        self.lowPowerMode = lowPowerMode
        self.thermalState = thermalState
    }

    /// These signals with every field `other` knows replaced by `other`'s.
    public func overridden(by other: DeviceSignals) -> DeviceSignals {
        DeviceSignals(
            availableMemoryBytes: other.availableMemoryBytes ?? availableMemoryBytes,
            batteryLevel: other.batteryLevel ?? batteryLevel,
            batteryState: other.batteryState ?? batteryState,
            lowPowerMode: other.lowPowerMode ?? lowPowerMode,
            thermalState: other.thermalState ?? thermalState
        )
    }

    /// Whether the battery is being charged (`charging` or `full`); `nil` when unknown.
    public var isCharging: Bool? {
        switch batteryState {
        case .charging?, .full?: return true
        case .unplugged?: return false
        case .unknown?, nil: return nil
        }
    }

    /// One line for people: `"battery 15% unplugged, low-power mode, thermal serious, 812 MB free"`.
    public var summary: String {
        var parts: [String] = []
        if let level = batteryLevel {
            var battery = "battery \(Int((level * 100).rounded()))%"
            if let state = batteryState, state != .unknown { battery += " \(state)" }
            parts.append(battery)
        }
        if lowPowerMode == true { parts.append("low-power mode") }
        if let thermal = thermalState { parts.append("thermal \(thermal)") }
        if let memory = availableMemoryBytes { parts.append("\(memory / 1_000_000) MB free") }
        return parts.isEmpty ? "no device signals" : parts.joined(separator: ", ")
    }
}

/// What a signal source reports besides new readings.
public enum DeviceEvent: Sendable, Equatable {
    /// A reading changed (thermal state, power mode, battery); read the sources again.
    case signalsChanged
    /// The OS asks for memory (iOS memory warning).
    case memoryWarning
}

/// A provider of device signals: the iOS system (`SystemSignalSource`), or an app's own
/// (`ManualSignalSource` for simulations and tests).
public protocol DeviceSignalSource: AnyObject, Sendable {
    /// The current readings; fields this source does not know are `nil`.
    func read() -> DeviceSignals
    /// Starts reporting events to `handler` (from any thread) until `stopObserving()`.
    func startObserving(_ handler: @escaping @Sendable (DeviceEvent) -> Void)
    /// Stops reporting events.
    func stopObserving()
}

/// How device signals become the runtime's `DeviceBudget` and memory warnings a
/// `MemoryPressure`. The runtime's selection policy then turns the budget into a submodel
/// (memory is a hard limit; low battery, low-power mode and heat cap the energy per token).
public struct BudgetPolicy: Sendable, Equatable {
    /// Memory kept for the rest of the app, subtracted from the available memory, bytes.
    public var reservedMemoryBytes: UInt64
    /// Available memory is rounded down to a multiple of this, so that small drifts between two
    /// readings do not re-plan, bytes.
    public var memoryGranularityBytes: UInt64
    /// Largest acceptable decode time per token, ms (`nil`: no latency target).
    public var latencyTargetMsPerToken: Double?
    /// Context each session must hold, tokens (`nil`: the session's context length).
    public var contextTokens: UInt32?
    /// A memory warning with less than this available is critical (go to the smallest submodel),
    /// bytes.
    public var criticalMemoryBytes: UInt64
    /// A memory warning within this many seconds of the previous one is critical.
    public var repeatedWarningSeconds: Double

    public init(
        reservedMemoryBytes: UInt64 = 0,
        memoryGranularityBytes: UInt64 = 16 << 20,
        latencyTargetMsPerToken: Double? = nil,
        contextTokens: UInt32? = nil,
        criticalMemoryBytes: UInt64 = 64 << 20,
        repeatedWarningSeconds: Double = 30
    ) {
        self.reservedMemoryBytes = reservedMemoryBytes
        self.memoryGranularityBytes = memoryGranularityBytes
        self.latencyTargetMsPerToken = latencyTargetMsPerToken
        self.contextTokens = contextTokens
        self.criticalMemoryBytes = criticalMemoryBytes
        self.repeatedWarningSeconds = repeatedWarningSeconds
    }

    /// The signals as the budget sees them: available memory rounded down to the granularity.
    /// Two readings that quantize equal give the same budgets.
    public func quantized(_ signals: DeviceSignals) -> DeviceSignals {
        var s = signals
        if let memory = s.availableMemoryBytes, memoryGranularityBytes > 0 {
            s.availableMemoryBytes = memory / memoryGranularityBytes * memoryGranularityBytes
        }
        return s
    }

    /// The budget for a session.
    ///
    /// - Parameters:
    ///   - signals: the device's readings.
    ///   - heldBytes: memory the session's current submodel already holds outside its weights (KV
    ///     cache and scratch: `footprintBytes - weightBytes` of its plan). The weights are mapped
    ///     from the file and do not count against the process's memory limit; the rest does, and
    ///     is given back to the budget so that a session does not shrink because of itself.
    ///   - sessionContext: the session's context length, tokens.
    public func budget(for signals: DeviceSignals, heldBytes: UInt64 = 0, sessionContext: UInt32? = nil) -> DeviceBudget {
        let s = quantized(signals)
        let memory = s.availableMemoryBytes.map { available -> UInt64 in
            let total = available.addingReportingOverflow(heldBytes)
            let sum = total.overflow ? UInt64.max : total.partialValue
            return sum > reservedMemoryBytes ? sum - reservedMemoryBytes : 0
        }
        let percent = s.batteryLevel.map { UInt8(max(0, min(100, ($0 * 100).rounded()))) }
        return DeviceBudget(
            availableMemoryBytes: memory,
            batteryPercent: percent,
            charging: s.isCharging,
            lowPowerMode: s.lowPowerMode,
            thermalState: s.thermalState,
            latencyTargetMsPerToken: latencyTargetMsPerToken,
            contextTokens: contextTokens ?? sessionContext
        )
    }

    /// How urgent a memory warning is: critical when little memory is left or when it repeats
    /// within `repeatedWarningSeconds` of the previous one, otherwise moderate.
    public func pressure(for signals: DeviceSignals, secondsSinceLastWarning: Double?) -> MemoryPressure {
        if let available = signals.availableMemoryBytes, available < criticalMemoryBytes { return .critical }
        if let since = secondsSinceLastWarning, since < repeatedWarningSeconds { return .critical }
        return .moderate
    }
}

/// A signal source whose readings the app sets: simulations ("low battery", "hot", "memory
/// pressure"), tests, or signals the app measures itself. Put it after `SystemSignalSource` in
/// a monitor's sources and the fields it knows override the system's.
public final class ManualSignalSource: DeviceSignalSource, @unchecked Sendable {
    private let lock = NSLock()
    private var signals: DeviceSignals
    private var handler: (@Sendable (DeviceEvent) -> Void)?

    public init(_ signals: DeviceSignals = DeviceSignals()) { self.signals = signals }

    public func read() -> DeviceSignals {
        lock.lock()
        defer { lock.unlock() }
        return signals
    }

    /// Replaces the readings and reports `signalsChanged`.
    public func set(_ new: DeviceSignals) {
        update { $0 = new }
    }

    /// Changes the readings and reports `signalsChanged`.
    public func update(_ change: (inout DeviceSignals) -> Void) {
        lock.lock()
        change(&signals)
        let h = handler
        lock.unlock()
        h?(.signalsChanged)
    }

    /// Reports a memory warning, as iOS does.
    public func simulateMemoryWarning() {
        lock.lock()
        let h = handler
        lock.unlock()
        h?(.memoryWarning)
    }

    public func startObserving(_ handler: @escaping @Sendable (DeviceEvent) -> Void) {
        lock.lock()
        self.handler = handler
        lock.unlock()
    }

    public func stopObserving() {
        lock.lock()
        handler = nil
        lock.unlock()
    }
}
