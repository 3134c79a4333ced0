# Included into llama.cpp's top-level project while pip builds llama-cpp-python.
# The Python package never loads llama.cpp's `common` library, but the wrapper forces
# LLAMA_BUILD_COMMON=ON; turning it off here halves the build time on 2 cores.
set(LLAMA_BUILD_COMMON OFF CACHE BOOL "" FORCE)
