import Foundation
import XCTest
@testable import Matformer

/// The signal model, its mapping to budgets and memory pressure, and the monitor that pushes
/// budgets to sessions, with fake signal sources (no iOS needed).
final class SignalTests: XCTestCase {
    // MARK: Mapping (pure)

    func testSignalsMapToTheBudget() {
        let policy = BudgetPolicy(memoryGranularityBytes: 0)
        XCTAssertEqual(policy.budget(for: DeviceSignals()), DeviceBudget(), "unknown signals: no constraint")

        let low = policy.budget(for: DeviceSignals(batteryLevel: 0.154, batteryState: .unplugged, lowPowerMode: true, thermalState: .serious))
        XCTAssertEqual(low.batteryPercent, 15)
        XCTAssertEqual(low.charging, false)
        XCTAssertEqual(low.lowPowerMode, true)
        XCTAssertEqual(low.thermalState, .serious)
        XCTAssertNil(low.availableMemoryBytes)

        XCTAssertEqual(policy.budget(for: DeviceSignals(batteryLevel: 1, batteryState: .full)).charging, true)
        XCTAssertEqual(policy.budget(for: DeviceSignals(batteryLevel: 0.5, batteryState: .charging)).charging, true)
        XCTAssertNil(policy.budget(for: DeviceSignals(batteryLevel: 0.5, batteryState: .unknown)).charging)
        XCTAssertEqual(policy.budget(for: DeviceSignals(batteryLevel: 1.7)).batteryPercent, 100, "clamped")
        XCTAssertEqual(policy.budget(for: DeviceSignals(batteryLevel: -0.2)).batteryPercent, 0, "clamped")
    }

    func testMemoryMapping() {
        let mib: UInt64 = 1 << 20
        let policy = BudgetPolicy(reservedMemoryBytes: 100 * mib, memoryGranularityBytes: 16 * mib, latencyTargetMsPerToken: 40, contextTokens: nil)
        let signals = DeviceSignals(availableMemoryBytes: 1000 * mib + 12345)
        // Rounded down to 16 MiB (992 MiB), minus the reserve, plus what the session holds.
        let budget = policy.budget(for: signals, heldBytes: 50 * mib, sessionContext: 512)
        XCTAssertEqual(budget.availableMemoryBytes, (992 - 100 + 50) * mib)
        XCTAssertEqual(budget.latencyTargetMsPerToken, 40)
        XCTAssertEqual(budget.contextTokens, 512)
        XCTAssertEqual(BudgetPolicy(contextTokens: 128).budget(for: signals, sessionContext: 512).contextTokens, 128)
        XCTAssertEqual(policy.budget(for: DeviceSignals(availableMemoryBytes: 10 * mib)).availableMemoryBytes, 0, "reserve larger than what is left")
        // Small drifts quantize equal.
        XCTAssertEqual(policy.quantized(DeviceSignals(availableMemoryBytes: 1000 * mib)), policy.quantized(signals))
    }

    func testMemoryWarningPressure() {
        let policy = BudgetPolicy(criticalMemoryBytes: 64 << 20, repeatedWarningSeconds: 30)
        XCTAssertEqual(policy.pressure(for: DeviceSignals(availableMemoryBytes: 500 << 20), secondsSinceLastWarning: nil), .moderate)
        XCTAssertEqual(policy.pressure(for: DeviceSignals(), secondsSinceLastWarning: 120), .moderate)
        XCTAssertEqual(policy.pressure(for: DeviceSignals(), secondsSinceLastWarning: 5), .critical, "a repeated warning")
        XCTAssertEqual(policy.pressure(for: DeviceSignals(availableMemoryBytes: 10 << 20), secondsSinceLastWarning: nil), .critical, "little memory left")
    }

    func testSourcesOverrideFieldByField() {
        let system = DeviceSignals(availableMemoryBytes: 1 << 30, batteryLevel: 0.8, batteryState: .unplugged, lowPowerMode: false, thermalState: .nominal)
        let merged = system.overridden(by: DeviceSignals(batteryLevel: 0.1, thermalState: .critical))
        XCTAssertEqual(merged, DeviceSignals(availableMemoryBytes: 1 << 30, batteryLevel: 0.1, batteryState: .unplugged, lowPowerMode: false, thermalState: .critical))
        XCTAssertEqual(merged.summary, "battery 10% unplugged, thermal critical, 1073 MB free")
        XCTAssertEqual(DeviceSignals().summary, "no device signals")
    }

    // MARK: Monitor with fake sources

    func testMonitorPushesBudgetChangesToSessions() async throws {
        let engine = try await Fixtures.openToy()
        let session = try engine.session()
        let system = ManualSignalSource(DeviceSignals(availableMemoryBytes: 4 << 30, batteryLevel: 0.9, batteryState: .unplugged, lowPowerMode: false, thermalState: .nominal))
        let simulated = ManualSignalSource()
        // The toy model needs a few MiB: read memory to the page.
        let monitor = BudgetMonitor(sources: [system, simulated], policy: BudgetPolicy(memoryGranularityBytes: 4096), pollInterval: nil)
        let updates = Locked<[BudgetUpdate]>([])
        monitor.onUpdate { update in updates.with { $0.append(update) } }
        monitor.start()
        defer { monitor.stop() }

        let attached = monitor.attach(session)
        XCTAssertEqual(attached.cause, .attached)
        XCTAssertEqual(attached.outcomes.first?.plan?.entry.name, "xl")
        XCTAssertEqual(session.lastPlan?.entry.name, "xl")
        XCTAssertNil(monitor.refresh(), "nothing changed: nothing pushed")

        // Low battery (simulated on top of the system's readings), reported as an event.
        simulated.update { $0.batteryLevel = 0.08 }
        let lowBattery = try await waitForUpdate(updates, count: 2)
        XCTAssertEqual(lowBattery.cause, .signalsChanged)
        XCTAssertEqual(lowBattery.signals.batteryLevel, 0.08)
        XCTAssertEqual(lowBattery.signals.availableMemoryBytes, 4 << 30, "the system's other readings stay")
        let lowPlan = try XCTUnwrap(lowBattery.outcomes.first?.plan)
        XCTAssertNotEqual(lowPlan.entry.name, "xl")
        XCTAssertEqual(lowPlan.decidingConstraint, "energy")
        XCTAssertTrue(lowBattery.explanation.contains("battery 8%"), lowBattery.explanation)
        let c = try await session.generateCompletion(.text(text: "a"), options: greedy(4))
        XCTAssertEqual(c.stats.submodel, lowPlan.entry.name, "the switch shows in the stats")

        // Plugged in: back to the largest.
        simulated.update { $0.batteryState = .charging }
        let charging = try await waitForUpdate(updates, count: 3)
        XCTAssertEqual(charging.outcomes.first?.plan?.entry.name, "xl")

        // Hot.
        simulated.update { $0.thermalState = .critical }
        let hot = try await waitForUpdate(updates, count: 4)
        let hotName = try XCTUnwrap(hot.outcomes.first?.plan?.entry.name)
        XCTAssertNotEqual(hotName, "xl")
        let afterHot = try await session.generateCompletion(.text(text: "b"), options: greedy(4))
        XCTAssertEqual(afterHot.stats.submodel, hotName)

        // Cooled down, then the system's memory shrinks: memory decides.
        simulated.update { $0.thermalState = .nominal }
        _ = try await waitForUpdate(updates, count: 5)
        let between = try Self.memoryBetweenSmallestAndLargest(engine, session)
        system.update { $0.availableMemoryBytes = between }
        let tight = try await waitForUpdate(updates, count: 6)
        XCTAssertEqual(tight.outcomes.first?.plan?.decidingConstraint, "memory")

        // Detached sessions get nothing.
        monitor.detach(session)
        system.update { $0.availableMemoryBytes = 4 << 30 }
        let none = try await waitForUpdate(updates, count: 7)
        XCTAssertTrue(none.outcomes.isEmpty)
    }

    func testMemoryWarningsBecomePressure() async throws {
        let engine = try await Fixtures.openToy()
        let session = try engine.session()
        let now = Locked(1000.0)
        let source = ManualSignalSource(DeviceSignals(availableMemoryBytes: 4 << 30))
        let monitor = BudgetMonitor(sources: [source], pollInterval: nil, clock: { now.get })
        let updates = Locked<[BudgetUpdate]>([])
        monitor.onUpdate { update in updates.with { $0.append(update) } }
        monitor.start()
        defer { monitor.stop() }
        monitor.attach(session)
        XCTAssertEqual(session.submodel, "xl")

        source.simulateMemoryWarning()
        let first = try await waitForUpdate(updates, count: 2)
        XCTAssertEqual(first.cause, .memoryWarning(.moderate))
        let moderate = try XCTUnwrap(first.outcomes.first?.submodel)
        XCTAssertNotEqual(moderate, "xl")
        let c = try await session.generateCompletion(.text(text: "a"), options: greedy(4))
        XCTAssertEqual(c.stats.submodel, moderate)

        // Another warning 10 s later: critical, the smallest submodel.
        now.with { $0 += 10 }
        let second = monitor.memoryWarning()
        XCTAssertEqual(second.cause, .memoryWarning(.critical))
        XCTAssertEqual(second.outcomes.first?.submodel, "s")
        XCTAssertTrue(second.explanation.contains("critical"), second.explanation)
    }

    func testNothingFitsSendsTheSessionToItsSmallestSubmodel() async throws {
        let engine = try await Fixtures.openToy()
        let session = try engine.session()
        let source = ManualSignalSource(DeviceSignals(availableMemoryBytes: 1 << 20))
        let monitor = BudgetMonitor(sources: [source], policy: BudgetPolicy(memoryGranularityBytes: 0), pollInterval: nil)
        let update = monitor.attach(session)
        let outcome = try XCTUnwrap(update.outcomes.first)
        guard case .nothingFits? = outcome.error else { return XCTFail("expected nothingFits, got \(String(describing: outcome.error))") }
        XCTAssertEqual(outcome.submodel, "s")
    }

    func testPollingPicksUpMemoryChanges() async throws {
        let engine = try await Fixtures.openToy()
        let session = try engine.session()
        let source = ManualSignalSource(DeviceSignals(availableMemoryBytes: 4 << 30))
        let monitor = BudgetMonitor(sources: [source], policy: BudgetPolicy(memoryGranularityBytes: 4096), pollInterval: 0.02)
        let updates = Locked<[BudgetUpdate]>([])
        monitor.onUpdate { update in updates.with { $0.append(update) } }
        monitor.attach(session)
        monitor.start()
        defer { monitor.stop() }
        // Memory has no notification: set the reading without an event; the poll finds it.
        source.stopObserving()
        let between = try Self.memoryBetweenSmallestAndLargest(engine, session)
        source.update { $0.availableMemoryBytes = between }
        let polled = try await waitForUpdate(updates, count: 2)
        XCTAssertEqual(polled.outcomes.first?.plan?.decidingConstraint, "memory")
    }

    func testLiveSwitchDuringAStreamedGeneration() async throws {
        let engine = try await Fixtures.openToy()
        let session = try engine.session()
        let hot = ManualSignalSource()
        let monitor = BudgetMonitor(sources: [hot], pollInterval: nil)
        monitor.start()
        defer { monitor.stop() }
        monitor.attach(session)
        let heard = Locked(0)
        // "Hot" is simulated from the listener at the fifth piece; the monitor pushes the new
        // budget to the running session, which switches at the next token boundary.
        let c = try await session.generateCompletion(.text(text: "The "), options: greedy(60)) { _ in
            if heard.with({ $0 += 1; return $0 }) == 5 {
                hot.update { $0.thermalState = .critical }
                _ = monitor.refresh()
            }
        }
        let event = try XCTUnwrap(c.stats.switches.first)
        XCTAssertEqual(event.from, "xl")
        XCTAssertGreaterThanOrEqual(event.atToken, 5)
        XCTAssertEqual(c.stats.submodel, session.lastPlan?.entry.name)
        XCTAssertNotEqual(c.stats.submodel, "xl")
    }

    /// An available-memory reading with which the smallest submodel fits and the largest does
    /// not, given what the session holds (the runtime plans within 90% of the budget).
    static func memoryBetweenSmallestAndLargest(_ engine: Engine, _ session: Session) throws -> UInt64 {
        let largest = try engine.select(DeviceBudget()).footprintBytes
        // The hottest budget runs the smallest submodel.
        let coolest = try engine.select(DeviceBudget(thermalState: .critical))
        XCTAssertEqual(coolest.entry.name, engine.catalog.first?.name)
        let smallest = coolest.footprintBytes
        XCTAssertLessThan(smallest, largest)
        let plan = try XCTUnwrap(session.lastPlan)
        let held = plan.footprintBytes - plan.weightBytes
        return UInt64(Double(smallest + largest) / 2 / 0.9) - held
    }

    /// Waits (up to 5 s) until `updates` holds `count` updates and returns the last.
    private func waitForUpdate(_ updates: Locked<[BudgetUpdate]>, count: Int) async throws -> BudgetUpdate {
        for _ in 0..<5000 {
            if updates.get.count >= count { return updates.get[count - 1] }
            try await Task.sleep(nanoseconds: 1_000_000)
        }
        XCTFail("no update \(count) (have \(updates.get.count))")
        throw CancellationError()
    }
}
