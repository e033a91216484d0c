package dev.matformer.sample

import android.os.Bundle
import androidx.activity.ComponentActivity
import androidx.activity.compose.setContent
import androidx.compose.foundation.layout.Arrangement
import androidx.compose.foundation.layout.Column
import androidx.compose.foundation.layout.Row
import androidx.compose.foundation.layout.fillMaxSize
import androidx.compose.foundation.layout.fillMaxWidth
import androidx.compose.foundation.layout.imePadding
import androidx.compose.foundation.layout.padding
import androidx.compose.foundation.lazy.LazyColumn
import androidx.compose.foundation.lazy.items
import androidx.compose.material3.Button
import androidx.compose.material3.Card
import androidx.compose.material3.FilterChip
import androidx.compose.material3.MaterialTheme
import androidx.compose.material3.OutlinedButton
import androidx.compose.material3.OutlinedTextField
import androidx.compose.material3.Surface
import androidx.compose.material3.Text
import androidx.compose.runtime.Composable
import androidx.compose.runtime.getValue
import androidx.compose.runtime.mutableStateOf
import androidx.compose.runtime.remember
import androidx.compose.runtime.setValue
import androidx.compose.ui.Modifier
import androidx.compose.ui.unit.dp
import androidx.lifecycle.viewmodel.compose.viewModel

class MainActivity : ComponentActivity() {
    override fun onCreate(savedInstanceState: Bundle?) {
        super.onCreate(savedInstanceState)
        setContent {
            MaterialTheme {
                Surface(Modifier.fillMaxSize()) { ChatScreen() }
            }
        }
    }
}

@Composable
fun ChatScreen(vm: ChatViewModel = viewModel()) {
    var input by remember { mutableStateOf("") }
    Column(Modifier.fillMaxSize().padding(12.dp).imePadding(), verticalArrangement = Arrangement.spacedBy(8.dp)) {
        // Which submodel runs, and why.
        Card(Modifier.fillMaxWidth()) {
            Column(Modifier.padding(12.dp)) {
                Text("Submodel: ${vm.submodel.ifEmpty { "…" }}", style = MaterialTheme.typography.titleMedium)
                Text(vm.why, style = MaterialTheme.typography.bodySmall)
                Text(vm.status, style = MaterialTheme.typography.labelSmall)
            }
        }
        // Simulated device conditions: the engine switches live.
        Row(horizontalArrangement = Arrangement.spacedBy(8.dp)) {
            FilterChip(selected = vm.lowBattery, onClick = vm::toggleLowBattery, label = { Text("Low battery") })
            FilterChip(selected = vm.hot, onClick = vm::toggleHot, label = { Text("Hot") })
            OutlinedButton(onClick = vm::simulateMemoryPressure) { Text("Memory pressure") }
        }
        LazyColumn(Modifier.weight(1f).fillMaxWidth(), verticalArrangement = Arrangement.spacedBy(6.dp)) {
            items(vm.lines) { line ->
                Text(
                    "${line.role}: ${line.text}",
                    style = if (line.role == "user") MaterialTheme.typography.bodyLarge else MaterialTheme.typography.bodyMedium,
                )
            }
        }
        Row(horizontalArrangement = Arrangement.spacedBy(8.dp)) {
            OutlinedTextField(value = input, onValueChange = { input = it }, modifier = Modifier.weight(1f), placeholder = { Text("Ask something") })
            if (vm.busy) {
                Button(onClick = vm::stop) { Text("Stop") }
            } else {
                Button(onClick = { vm.send(input); input = "" }) { Text("Send") }
            }
        }
    }
}
