# The smallest image there is: no base, one file copied from the build context (hello/).
FROM scratch
COPY hello /
CMD ["/hello"]
