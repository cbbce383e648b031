# The classic "what not to do": every RUN is its own layer, so the compiler, the apt lists, the
# tarball and the build tree stay in the image, even if a later RUN deletes them.
FROM debian:stretch

RUN apt-get update
RUN apt-get install -y gcc libc6-dev make wget
RUN wget -O redis.tar.gz "http://download.redis.io/releases/redis-5.0.3.tar.gz"
RUN mkdir -p /usr/src/redis
RUN tar -xzf redis.tar.gz -C /usr/src/redis --strip-components=1
RUN make -C /usr/src/redis
RUN make -C /usr/src/redis install
RUN rm -rf /var/lib/apt/lists/* redis.tar.gz /usr/src/redis \
    && apt-get purge -y --auto-remove gcc libc6-dev make wget
