// MatformerChat: a SwiftUI chat over the Matformer package that shows which submodel runs and
// why, and switches live when "low battery", "hot" or "memory pressure" is simulated.
//
// Sources only: create an iOS App target in Xcode (iOS 16+), add these three files, add the local
// package bindings/ios (after ./build-xcframework.sh) and its product Matformer, and bundle a
// model as model.matf (for example SmolLM2-135M-Instruct imported with `matformer import`).
import SwiftUI

@main
struct MatformerChatApp: App {
    var body: some Scene {
        WindowGroup {
            ChatView(modelPath: Bundle.main.path(forResource: "model", ofType: "matf"))
        }
    }
}
