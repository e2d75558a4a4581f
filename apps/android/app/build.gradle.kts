plugins {
    id("com.android.application")
    id("org.jetbrains.kotlin.android")
}

android {
    namespace = "dev.ondevice.chat"
    compileSdk = 35
    defaultConfig {
        applicationId = "dev.ondevice.chat"
        minSdk = 28
        targetSdk = 35
        ndk { abiFilters += listOf("arm64-v8a") }
    }
}

dependencies {
    // ExecuTorch runtime with the XNNPACK backend (the .pte from `ondevice export --format pte` is lowered to it).
    implementation("org.pytorch:executorch-android:0.7.0")
    // HuggingFace tokenizers (tokenizer.json) on Android.
    implementation("ai.djl.huggingface:tokenizers:0.33.0")
    implementation("ai.djl.android:tokenizer-native:0.33.0")
}
