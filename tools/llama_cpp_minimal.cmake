# Included by llama.cpp's own project() (CMAKE_PROJECT_llama.cpp_INCLUDE, set in the Makefile's LLAMA_CMAKE_ARGS):
# llama-cpp-python's CMakeLists forces LLAMA_BUILD_COMMON on, but the Python bindings load only libllama and ggml.
# llama-common (chat/JSON/Jinja parsers, an HTTP client) is 53 of the default build's 178 compile units.
set(LLAMA_BUILD_COMMON OFF CACHE BOOL "llama: build common utils library" FORCE)
