/**
 * A PocketPal-style chat screen over @ondevice/react-native: download a bundle (resumable, verified, with a
 * progress bar and a cancel button), load it after the memory check, then chat with streamed replies, tokens/s,
 * a stop button and a "JSON" mode that asks for schema-constrained output.
 *
 * Drop it into an app that has llama.rn (GGUF bundles) or react-native-executorch (.pte bundles) and
 * react-native-blob-util installed; BUNDLE_URL is a folder served over HTTP(S) holding what
 * `ondevice export MODEL --app react-native -o DIR` wrote.
 */

import React, { useCallback, useEffect, useRef, useState } from 'react';
import { ActivityIndicator, FlatList, Pressable, StyleSheet, Text, TextInput, View } from 'react-native';

import {
  BlobUtilBundleIO,
  type ChatMessage,
  downloadBundle,
  type GenerationStats,
  InsufficientMemoryError,
  loadModel,
  OndeviceError,
  type OndeviceModel,
} from '../src';

const BUNDLE_URL = 'https://example.com/bundles/smollm2-135m-instruct-rn/';
const ISSUE_SCHEMA = {
  type: 'object',
  properties: { title: { type: 'string' }, type: { enum: ['bug', 'feature', 'question'] } },
  required: ['title', 'type'],
};

type Phase =
  | { kind: 'idle' }
  | { kind: 'downloading'; fraction: number }
  | { kind: 'loading' }
  | { kind: 'ready' }
  | { kind: 'error'; message: string };

export function ChatScreen(): React.JSX.Element {
  const [phase, setPhase] = useState<Phase>({ kind: 'idle' });
  const [messages, setMessages] = useState<ChatMessage[]>([]);
  const [draft, setDraft] = useState('');
  const [streaming, setStreaming] = useState<string | null>(null);
  const [stats, setStats] = useState<GenerationStats | null>(null);
  const [liveSpeed, setLiveSpeed] = useState(0);
  const [jsonMode, setJsonMode] = useState(false);
  const model = useRef<OndeviceModel | null>(null);
  const abort = useRef<AbortController | null>(null);

  useEffect(() => () => void model.current?.release(), []);

  const start = useCallback(async () => {
    const io = new BlobUtilBundleIO();
    abort.current = new AbortController();
    try {
      setPhase({ kind: 'downloading', fraction: 0 });
      const { dest } = await downloadBundle({
        url: BUNDLE_URL, dest: `${io.documentDir}/bundles/smollm2`, io, signal: abort.current.signal,
        onProgress: (p) => setPhase({ kind: 'downloading', fraction: p.bytes / p.totalBytes }),
      });
      setPhase({ kind: 'loading' });
      model.current = await loadModel(dest, { io });
      setPhase({ kind: 'ready' });
    } catch (e) {
      const message = e instanceof InsufficientMemoryError
        ? `This phone cannot hold the model: ${e.message}`
        : e instanceof OndeviceError ? e.message : String(e);
      setPhase({ kind: 'error', message });
    }
  }, []);

  const send = useCallback(async () => {
    const m = model.current;
    if (!m || !draft.trim() || streaming !== null) return;
    const conversation: ChatMessage[] = [...messages, { role: 'user', content: draft.trim() }];
    setMessages(conversation);
    setDraft('');
    setStreaming('');
    let text = '';
    const onToken = (token: string, tokensPerSecond: number): void => {
      text += token;
      setStreaming(text);
      setLiveSpeed(tokensPerSecond);
    };
    try {
      const result = jsonMode
        ? await m.chatJson(conversation, ISSUE_SCHEMA, { onToken })
        : await m.chat(conversation, { onToken });
      setMessages([...conversation, { role: 'assistant', content: result.text }]);
      setStats(result.stats);
    } catch (e) {
      setMessages([...conversation, { role: 'assistant', content: `(${e instanceof Error ? e.message : String(e)})` }]);
    } finally {
      setStreaming(null);
    }
  }, [draft, jsonMode, messages, streaming]);

  if (phase.kind !== 'ready') {
    return (
      <View style={styles.center}>
        {phase.kind === 'idle' && <Button label="Download and load the model" onPress={start} />}
        {phase.kind === 'downloading' && (
          <>
            <Text>Downloading… {(phase.fraction * 100).toFixed(0)}%</Text>
            <View style={styles.bar}><View style={[styles.fill, { width: `${phase.fraction * 100}%` }]} /></View>
            <Button label="Cancel (resumes next time)" onPress={() => abort.current?.abort()} />
          </>
        )}
        {phase.kind === 'loading' && <ActivityIndicator />}
        {phase.kind === 'error' && (
          <>
            <Text style={styles.error}>{phase.message}</Text>
            <Button label="Retry" onPress={start} />
          </>
        )}
      </View>
    );
  }

  const rows = streaming === null ? messages : [...messages, { role: 'assistant' as const, content: streaming }];
  return (
    <View style={styles.screen}>
      <Text style={styles.header}>{model.current?.manifest.model.name} · {model.current?.runtime}</Text>
      <FlatList
        data={rows}
        keyExtractor={(_, i) => String(i)}
        renderItem={({ item }) => (
          <View style={[styles.bubble, item.role === 'user' ? styles.user : styles.assistant]}>
            <Text>{item.content}</Text>
          </View>
        )}
      />
      <Text style={styles.stats}>
        {streaming !== null
          ? `${liveSpeed.toFixed(1)} tok/s`
          : stats ? `${stats.generatedTokens} tokens · ${stats.tokensPerSecond.toFixed(1)} tok/s · ${stats.stoppedBy}` : ''}
      </Text>
      <View style={styles.row}>
        <TextInput style={styles.input} value={draft} onChangeText={setDraft} placeholder="Message" />
        <Button label={jsonMode ? 'JSON on' : 'JSON off'} onPress={() => setJsonMode(!jsonMode)} />
        {streaming !== null
          ? <Button label="Stop" onPress={() => void model.current?.stop()} />
          : <Button label="Send" onPress={send} />}
      </View>
    </View>
  );
}

function Button({ label, onPress }: { label: string; onPress: () => void }): React.JSX.Element {
  return (
    <Pressable style={styles.button} onPress={onPress}>
      <Text style={styles.buttonText}>{label}</Text>
    </Pressable>
  );
}

const styles = StyleSheet.create({
  screen: { flex: 1, padding: 12 },
  center: { flex: 1, alignItems: 'center', justifyContent: 'center', gap: 12, padding: 24 },
  header: { fontWeight: '600', marginBottom: 8 },
  bubble: { borderRadius: 12, padding: 10, marginVertical: 4, maxWidth: '85%' },
  user: { alignSelf: 'flex-end', backgroundColor: '#dbeafe' },
  assistant: { alignSelf: 'flex-start', backgroundColor: '#f3f4f6' },
  stats: { color: '#6b7280', fontSize: 12, marginVertical: 4 },
  row: { flexDirection: 'row', alignItems: 'center', gap: 6 },
  input: { flex: 1, borderWidth: 1, borderColor: '#d1d5db', borderRadius: 8, paddingHorizontal: 10, height: 40 },
  button: { backgroundColor: '#2563eb', borderRadius: 8, paddingHorizontal: 12, paddingVertical: 10 },
  buttonText: { color: 'white', fontWeight: '600' },
  bar: { width: '80%', height: 8, backgroundColor: '#e5e7eb', borderRadius: 4, overflow: 'hidden' },
  fill: { height: 8, backgroundColor: '#2563eb' },
  error: { color: '#b91c1c', textAlign: 'center' },
});
