// One screen: a transcript, a text field and a Send button. The bundle is pushed to the app's files dir:
//   adb push model-bundle /data/local/tmp/ && adb shell run-as dev.ondevice.chat cp -r /data/local/tmp/model-bundle files/
package dev.ondevice.chat

import android.app.Activity
import android.os.Bundle
import android.widget.Button
import android.widget.EditText
import android.widget.LinearLayout
import android.widget.ScrollView
import android.widget.TextView
import java.io.File
import kotlin.concurrent.thread

class MainActivity : Activity() {
    private var chat: PteChat? = null
    private val history = ArrayList<Pair<String, String>>()

    override fun onCreate(savedInstanceState: Bundle?) {
        super.onCreate(savedInstanceState)
        val transcript = TextView(this)
        val input = EditText(this)
        val send = Button(this).apply { text = "Send"; isEnabled = false }
        setContentView(LinearLayout(this).apply {
            orientation = LinearLayout.VERTICAL
            addView(ScrollView(context).apply { addView(transcript) }, LinearLayout.LayoutParams(-1, 0, 1f))
            addView(input)
            addView(send)
        })
        thread {
            val result = runCatching { PteChat(BundleManifest.load(File(filesDir, "model-bundle"))) }
            runOnUiThread {
                result.onSuccess { chat = it; send.isEnabled = true; transcript.text = "ready\n" }
                    .onFailure { transcript.text = "cannot load the bundle: ${it.message}" }
            }
        }
        send.setOnClickListener {
            val text = input.text.toString().trim()
            if (text.isEmpty()) return@setOnClickListener
            input.setText("")
            history.add("user" to text)
            transcript.append("\nyou: $text\nmodel: ")
            send.isEnabled = false
            thread {
                val reply = StringBuilder()
                chat?.reply(history) { piece -> reply.append(piece); runOnUiThread { transcript.append(piece) }; true }
                history.add("assistant" to reply.toString())
                runOnUiThread { send.isEnabled = true }
            }
        }
    }

    override fun onDestroy() {
        chat?.close()
        super.onDestroy()
    }
}
