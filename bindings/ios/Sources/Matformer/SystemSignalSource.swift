#if os(iOS)
import Foundation
import UIKit
import os

/// The iPhone's own signals, read for a `BudgetMonitor`:
///
/// - available memory: `os_proc_available_memory()` (read at every poll: it has no
///   notification);
/// - thermal state: `ProcessInfo.thermalState` and `thermalStateDidChangeNotification`;
/// - Low Power Mode: `ProcessInfo.isLowPowerModeEnabled` and `NSProcessInfoPowerStateDidChange`;
/// - battery: `UIDevice.batteryLevel` / `batteryState` and their notifications (battery
///   monitoring is turned on);
/// - memory warnings: `UIApplication.didReceiveMemoryWarningNotification`, reported as
///   `DeviceEvent.memoryWarning` (the monitor maps them to memory pressure).
///
/// Only the readings live here; what they mean for the model is `BudgetPolicy`'s, which is
/// platform-free and tested with fake sources.
public final class SystemSignalSource: DeviceSignalSource, @unchecked Sendable {
    private let lock = NSLock()
    private var batteryLevel: Float?
    private var batteryState: BatteryState?
    private var handler: (@Sendable (DeviceEvent) -> Void)?
    private var observing = false
    private var observers: [NSObjectProtocol] = []

    /// Turns on battery monitoring and reads the battery (UIKit: on the main actor).
    @MainActor
    public init() {
        UIDevice.current.isBatteryMonitoringEnabled = true
        readBattery()
    }

    deinit { observers.forEach(NotificationCenter.default.removeObserver) }

    public func read() -> DeviceSignals {
        let info = ProcessInfo.processInfo
        // 0 when the process has no memory limit (the simulator): unknown.
        let available = os_proc_available_memory()
        lock.lock()
        defer { lock.unlock() }
        return DeviceSignals(
            availableMemoryBytes: available > 0 ? UInt64(available) : nil,
            batteryLevel: batteryLevel,
            batteryState: batteryState,
            lowPowerMode: info.isLowPowerModeEnabled,
            thermalState: Self.thermalState(info.thermalState)
        )
    }

    public func startObserving(_ handler: @escaping @Sendable (DeviceEvent) -> Void) {
        lock.lock()
        self.handler = handler
        observing = true
        lock.unlock()
        Task { @MainActor in self.syncObservers() }
    }

    public func stopObserving() {
        lock.lock()
        handler = nil
        observing = false
        lock.unlock()
        Task { @MainActor in self.syncObservers() }
    }

    // MARK: Internals

    static func thermalState(_ state: ProcessInfo.ThermalState) -> ThermalState? {
        switch state {
        case .nominal: return .nominal
        case .fair: return .fair
        case .serious: return .serious
        case .critical: return .critical
        @unknown default: return nil
        }
    }

    static func batteryState(_ state: UIDevice.BatteryState) -> BatteryState {
        switch state {
        case .unplugged: return .unplugged
        case .charging: return .charging
        case .full: return .full
        case .unknown: return .unknown
        @unknown default: return .unknown
        }
    }

    @MainActor
    private func readBattery() {
        let device = UIDevice.current
        let level = device.batteryLevel
        let state = Self.batteryState(device.batteryState)
        lock.lock()
        batteryLevel = level < 0 ? nil : level
        batteryState = state
        lock.unlock()
    }

    private func emit(_ event: DeviceEvent) {
        lock.lock()
        let h = handler
        lock.unlock()
        h?(event)
    }

    /// Installs or removes the observers to match `observing` (start and stop may come from
    /// any thread; this runs on the main actor, whatever their order).
    @MainActor
    private func syncObservers() {
        lock.lock()
        let wanted = observing
        lock.unlock()
        let center = NotificationCenter.default
        observers.forEach(center.removeObserver)
        observers = []
        guard wanted else { return }

        let changed: @Sendable (Notification) -> Void = { [weak self] _ in self?.emit(.signalsChanged) }
        observers.append(center.addObserver(forName: ProcessInfo.thermalStateDidChangeNotification, object: nil, queue: nil, using: changed))
        observers.append(center.addObserver(forName: .NSProcessInfoPowerStateDidChange, object: nil, queue: nil, using: changed))
        let battery: @Sendable (Notification) -> Void = { [weak self] _ in
            Task { @MainActor in
                guard let self else { return }
                self.readBattery()
                self.emit(.signalsChanged)
            }
        }
        observers.append(center.addObserver(forName: UIDevice.batteryLevelDidChangeNotification, object: nil, queue: .main, using: battery))
        observers.append(center.addObserver(forName: UIDevice.batteryStateDidChangeNotification, object: nil, queue: .main, using: battery))
        observers.append(center.addObserver(forName: UIApplication.didReceiveMemoryWarningNotification, object: nil, queue: nil) { [weak self] _ in
            self?.emit(.memoryWarning)
        })
        // Readings may have changed while nobody listened.
        readBattery()
        emit(.signalsChanged)
    }
}
#endif
